"""Functional API: every op's functional form, gathered from the op's own file.

Each function checks its inputs, applies autocast, resolves the backend and calls the op
once. Every function accepts ``backend=`` (None: the :func:`attnpool.use_backend` context,
then ``ATTNPOOL_BACKEND``, then ``"auto"``). ``"reference"`` runs the plain-PyTorch
reference of :mod:`attnpool.reference`.
"""

from __future__ import annotations

from attnpool.attention_cluster import attention_cluster
from attnpool.attentional_pooling import attentional_pooling, pose_attentional_pooling
from attnpool.pyramid_attention import pyramid_attention
from attnpool.st_regularizer import st_regularizer, temporal_attention_pool
from attnpool.weighted_pool import masked_frame_means

__all__ = [
    "attention_cluster", "attentional_pooling", "masked_frame_means", "pose_attentional_pooling",
    "pyramid_attention", "st_regularizer", "temporal_attention_pool",
]
