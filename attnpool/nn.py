"""The modules: parameters (shared with their reference twins) + a call into functional."""

from __future__ import annotations

from torch import Tensor

from attnpool import functional, losses, reference

__all__ = [
    "AttentionCluster", "AttentionalPooling", "MultimodalAttentionClusters", "PyramidAttention",
    "SpatioTemporalAttention",
]


class AttentionCluster(reference.AttentionCluster):
    """Attention clusters (Long et al., CVPR 2018) with fused kernels.

    N attention units each softmax-pool the frames of ``x [B, L, F]``; with
    ``shift=True`` each unit's result is shifted and L2-normalised,
    ``o_n = (α_n·v_n + β_n) / (√N·‖α_n·v_n + β_n‖)``. Output ``[B, N·F]`` (unit-major).

    Args:
        in_features: F. num_units: N.
        attention: "fc1" (linear scores), "fc2" (shared tanh hidden layer of
            ``hidden_features`` units) or "average".
        shift: the shifting operation + L2 norm.
        eps, eps_placement: the norm is max(‖u‖, eps) with ``"clamp"`` (default) and
            sqrt(‖u‖² + eps) with ``"sqrt"`` (PaddlePaddle's); every backend computes both.
        backend: None (context / ``ATTNPOOL_BACKEND`` / auto), "auto", "reference",
            "cpp", "cuda" or "triton".

    Parameters ``weight``, ``bias``, ``alpha``, ``beta`` (and ``weight1``, ``bias1`` for
    fc2) match :class:`attnpool.reference.AttentionCluster`; :meth:`from_official` loads the
    official checkpoints (first author's PyTorch code, PaddlePaddle, MindSpore).
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
            shift=self.shift, eps=self.eps, eps_placement=self.eps_placement,
            backend=self.backend,
        )
        return (out, attn) if return_attention else out


class MultimodalAttentionClusters(reference.MultimodalAttentionClusters):
    """One fused :class:`AttentionCluster` per modality, outputs concatenated in the
    order of ``modalities``: ``MultimodalAttentionClusters({"rgb": (2048, 64), "audio": (128, 32)})``."""

    cluster_class = AttentionCluster


class AttentionalPooling(reference.AttentionalPooling):
    """Rank-P attentional pooling (Girdhar & Ramanan, NeurIPS 2017) with fused kernels.

    A drop-in for ``AdaptiveAvgPool2d(1) + flatten + Linear(C, K)`` on ``[B, C, H, W]``
    (NCHW or channels-last); clips ``[B, T, C, H, W]`` average the per-frame logits.
    ``score_k = Σ_p mean_i h[p,i]·t[p,k,i]`` with bottom-up maps ``h`` (class-agnostic)
    and top-down maps ``t`` (one per class), computed in the factored form that never
    builds the ``[H·W, K]`` top-down maps.

    Args:
        in_channels: C. num_classes: K. rank: P. bias: bottom-up and top-down biases.
        pose_keypoints: J enables the pose-regularised variant: a 1×1 conv + ReLU of
            ``pose_channels`` "pose pre-logits" feeds the bottom-up maps and a keypoint
            heatmap head (``forward(..., return_heatmaps=True)``, :meth:`pose_loss`).
            Its pooling of x under those maps runs in the fused ``weighted_pool`` kernel.
            ``pose_init="official"``: the official pose layer init, N(0, 0.001).
        top_down_dropout: dropout probability of the features feeding the top-down maps, in
            training (the official graph's: 0.8, i.e. keep 0.2); then the pooling runs in the
            fused ``weighted_pool`` kernel.
        backend: None (context / ``ATTNPOOL_BACKEND`` / auto), "auto", "reference", "cpp",
            "cuda" or "triton".

    Parameters ``weight_bottom_up [P, C]``, ``bias_bottom_up [P]``, ``weight_top_down [P, K, C]``,
    ``bias_top_down [P, K]`` match :class:`attnpool.reference.AttentionalPooling`.
    """

    def __init__(self, in_channels: int, num_classes: int, *, backend: str | None = None, **kwargs):
        super().__init__(in_channels, num_classes, **kwargs)
        self.backend = backend

    def _pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return functional.attentional_pooling(
            x, self.weight_bottom_up, self.bias_bottom_up, self.weight_top_down,
            self.bias_top_down, backend=self.backend)

    def _pose_pool(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        return functional.pose_attentional_pooling(
            x, q, self.weight_bottom_up, self.bias_bottom_up, self.weight_top_down,
            self.bias_top_down, backend=self.backend)


class SpatioTemporalAttention(reference.SpatioTemporalAttention):
    """Spatio-temporal attention (Meng et al., "Where and When to Look?") with fused kernels.

    The official mask network (three 3×3 convs with BN + ReLU, sigmoid) gives a spatial mask
    per frame; a linear temporal scorer on the masked, spatially averaged frame features gives
    softmax weights over the T frames; the output is the weighted sum of those features.
    The masked means read x once (fused ``weighted_pool``); ``.regularizer(mask, w)`` is the
    fused :class:`attnpool.losses.SpatioTemporalRegularizer`.

    ``temporal="convlstm"``: the official temporal model instead, a ConvLSTM (plain PyTorch,
    C -> ``temporal_hidden``) over the masked features, scored and pooled on its outputs'
    spatial means; ``dropout``: the official input channel dropout (0.2). :meth:`from_official`
    loads the official weights.

    ``forward(x [B, T, C, H, W], return_attention=False)`` -> ``[B, out_features]`` (and mask
    ``[B, T, H, W]``, w ``[B, T]``). Same state_dict as the reference twin.
    """

    def __init__(self, in_channels: int, mask_hidden: tuple[int, int] = (1024, 512), *,
                 backend: str | None = None, **kwargs) -> None:
        super().__init__(in_channels, mask_hidden, **kwargs)
        self.regularizer = losses.SpatioTemporalRegularizer(
            self.regularizer.tv_weight, self.regularizer.contrast_weight,
            self.regularizer.unimodal_weight)
        self.backend = backend

    @property
    def backend(self) -> str | None:
        """The backend of the pooling and of ``.regularizer`` (setting it sets both)."""
        return self.regularizer.backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self.regularizer.backend = name

    def _frame_means(self, x: Tensor, mask: Tensor) -> Tensor:
        return functional.masked_frame_means(x, mask, backend=self.backend)


class PyramidAttention(reference.PyramidAttention):
    """Interaction-aware pyramid attention (our formulation of Du et al., ECCV 2018) with
    fused kernels.

    Each level's map is average-pooled to the last map's H×W (R), scored per position
    (``y_s = R(X_s)·w_s + b_s``); one softmax over the summed scores pools every level, and
    the outputs are concatenated. The loss rewards the variance of each level's centred map
    along its unit score map (PCA guidance) and penalises overlap between levels' score maps.

    Args:
        in_channels: C_s of each level, e.g. ``[256, 512, 1024, 2048]``.
        eps: lower bound of each score map's norm. diversity_weight: λ of the overlap term.
        backend: None (context / ``ATTNPOOL_BACKEND`` / auto), "auto", "reference", "cpp",
            "cuda" or "triton".

    ``forward(maps, return_loss=False)``: maps ``[B, C_s, H_s, W_s]`` or clips
    ``[B, T, C_s, H_s, W_s]`` -> ``out [B, Σ C_s]`` (and the 0-dim loss with
    ``return_loss=True``). Parameters ``score_weights`` (level s: ``[C_s]``) and
    ``score_bias [S]``, as :class:`attnpool.reference.PyramidAttention`.
    """

    def __init__(self, in_channels: list[int], eps: float = 1e-12, diversity_weight: float = 1.0,
                 *, backend: str | None = None, **kwargs) -> None:
        super().__init__(in_channels, eps, diversity_weight, **kwargs)
        self.backend = backend

    def forward(self, maps: list[Tensor], return_loss: bool = False):
        reference.check_pyramid_maps(maps, self.in_channels)
        out, loss = functional.pyramid_attention(
            maps, list(self.score_weights), self.score_bias, self.eps, self.diversity_weight,
            backend=self.backend)
        return (out, loss) if return_loss else out
