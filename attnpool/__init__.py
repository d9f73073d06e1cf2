"""attnpool: fused kernels for attention pooling in action recognition.

Modules: :class:`AttentionCluster`, :class:`MultimodalAttentionClusters`,
:class:`AttentionalPooling`, :class:`SpatioTemporalAttention`,
:class:`PyramidAttention` (+ :mod:`attnpool.losses`).
Model surgery: :mod:`attnpool.swap`.
Backends: ``backend=`` argument, :func:`use_backend`, or ``ATTNPOOL_BACKEND``.
"""

from attnpool import functional, losses, reference, swap
from attnpool.backends import BackendUnavailableError, available, use_backend
from attnpool.nn import (
    AttentionalPooling,
    AttentionCluster,
    MultimodalAttentionClusters,
    PyramidAttention,
    SpatioTemporalAttention,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionCluster",
    "AttentionalPooling",
    "BackendUnavailableError",
    "MultimodalAttentionClusters",
    "PyramidAttention",
    "SpatioTemporalAttention",
    "available",
    "functional",
    "losses",
    "reference",
    "swap",
    "use_backend",
]
