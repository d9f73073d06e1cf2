"""The modules, gathered from their ops' files: parameters shared with their reference twins
(:mod:`attnpool.reference`) + a call into the op's functional form."""

from __future__ import annotations

from attnpool.attention_cluster import AttentionCluster, MultimodalAttentionClusters
from attnpool.attentional_pooling import AttentionalPooling
from attnpool.pyramid_attention import PyramidAttention
from attnpool.st_regularizer import SpatioTemporalAttention

__all__ = [
    "AttentionCluster", "AttentionalPooling", "MultimodalAttentionClusters", "PyramidAttention",
    "SpatioTemporalAttention",
]
