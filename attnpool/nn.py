"""The modules: parameters (shared with their reference twins) + a call into functional."""

from __future__ import annotations

from torch import Tensor

from attnpool import functional, reference

__all__ = ["AttentionCluster", "MultimodalAttentionClusters"]


class AttentionCluster(reference.AttentionCluster):
    """Attention clusters (Long et al., CVPR 2018) with fused kernels.

    N attention units each softmax-pool the frames of ``x [B, L, F]``; with
    ``shift=True`` each unit's result is shifted and L2-normalised,
    ``o_n = (α_n·v_n + β_n) / (√N·‖α_n·v_n + β_n‖)``. Output ``[B, N·F]`` (unit-major).

    Args:
        in_features: F. num_units: N.
        attention: "fc1" (linear scores), "fc2" (shared tanh hidden layer of
            ``hidden_features`` units) or "average".
        shift: the shifting operation + L2 norm. eps: lower bound of the norm.
        backend: None (context / ``ATTNPOOL_BACKEND`` / auto), "auto", "reference",
            "cpp", "cuda" or "triton".

    Parameters ``weight``, ``bias``, ``alpha``, ``beta`` (and ``weight1``, ``bias1`` for
    fc2) match :class:`attnpool.reference.AttentionCluster` and the official code.
    """

    def __init__(self, in_features: int, num_units: int, *, backend: str | None = None, **kwargs):
        super().__init__(in_features, num_units, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, lengths: Tensor | None = None, return_attention: bool = False):
        """x ``[B, L, F]``, lengths int ``[B]`` (optional) -> ``[B, N·F]``
        (and attention ``[B, N, L]`` with ``return_attention=True``)."""
        out, attn = functional.attention_cluster(
            x, self.weight, self.bias, self.alpha, self.beta, lengths,
            attention=self.attention, weight1=self.weight1, bias1=self.bias1,
            shift=self.shift, eps=self.eps, backend=self.backend,
        )
        return (out, attn) if return_attention else out


class MultimodalAttentionClusters(reference.MultimodalAttentionClusters):
    """One fused :class:`AttentionCluster` per modality, outputs concatenated in the
    order of ``modalities``: ``MultimodalAttentionClusters({"rgb": (2048, 64), "audio": (128, 32)})``."""

    cluster_class = AttentionCluster
