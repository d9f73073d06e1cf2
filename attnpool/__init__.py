"""attnpool: fused kernels for attention pooling in action recognition.

Modules: :class:`AttentionCluster`, :class:`MultimodalAttentionClusters`.
Backends: ``backend=`` argument, :func:`use_backend`, or ``ATTNPOOL_BACKEND``.
"""

from attnpool import functional, reference
from attnpool.backends import BackendUnavailableError, available, use_backend
from attnpool.nn import AttentionCluster, MultimodalAttentionClusters

__version__ = "0.1.0"

__all__ = [
    "AttentionCluster",
    "BackendUnavailableError",
    "MultimodalAttentionClusters",
    "available",
    "functional",
    "reference",
    "use_backend",
]
