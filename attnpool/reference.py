"""Plain-PyTorch reference of every op: the executable spec.

Written the way the papers and their official code write them, not the way the
fused kernels compute them. Autograd is PyTorch's. Tests compare every backend
with these functions evaluated in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnpool import official

__all__ = [
    "AttentionCluster",
    "AttentionalPooling",
    "attentional_pooling",
    "attentional_pooling_op",
    "MultimodalAttentionClusters",
    "attention_cluster",
    "attention_scores",
    "attention_cluster_op",
    "ConvLSTM",
    "init_attention_cluster_",
    "PyramidAttention",
    "pyramid_attention",
]


# --------------------------------------------------------------------------
# Attention clusters (Long et al., CVPR 2018), docs/design.md "Attention clusters"
# --------------------------------------------------------------------------
EPS_PLACEMENTS = ("clamp", "sqrt")


def valid_frames(lengths: Tensor, L: int) -> Tensor:
    """``[B, L]`` bool: frame l of sample b is valid (l < lengths[b])."""
    return torch.arange(L, device=lengths.device) < lengths[:, None]


def zero_padded_frames(x: Tensor, lengths: Tensor | None) -> Tensor:
    """x ``[B, L, F]`` with the frames past ``lengths`` set to 0 (x itself without lengths):
    whatever padding holds, NaN included, it then reaches no output and no gradient."""
    if lengths is None:
        return x
    return x.masked_fill(~valid_frames(lengths.to(x.device), x.shape[1])[:, :, None], 0)


def attention_scores(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    attention: str = "fc1",
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    num_units: int | None = None,
) -> Tensor:
    """Unnormalised attention scores ``[B, L, N]`` of every unit for every frame.

    ``attention="average"`` has no weights: every frame scores 0 (``num_units`` says N).
    """
    if attention == "average":
        return x.new_zeros(x.shape[0], x.shape[1], num_units)
    keys = x
    if attention == "fc2":
        keys = torch.tanh(F.linear(x, weight1, bias1))
    return F.linear(keys, weight, bias)


def attention_cluster_op(
    x: Tensor,
    scores: Tensor,
    lengths: Tensor | None,
    alpha: Tensor,
    beta: Tensor,
    shift: bool = True,
    eps: float = 1e-12,
    eps_placement: str = "clamp",
) -> tuple[Tensor, Tensor]:
    """Softmax over valid frames, weighted sum, shifting operation and L2 norm.

    x ``[B, L, F]``, scores ``[B, L, N]`` -> (out ``[B, N*F]``, attention ``[B, N, L]``).
    Frames past ``lengths`` do not take part at all: whatever they hold (NaN included),
    output and gradients are those of the valid frames, and their gradient is 0.
    The norm of u = alpha·v + beta is max(‖u‖, eps) (``eps_placement="clamp"``, torch's
    clamp_min) or sqrt(‖u‖² + eps) (``"sqrt"``, PaddlePaddle's l2_normalize).
    """
    if eps_placement not in EPS_PLACEMENTS:
        raise ValueError(f"eps_placement must be one of {EPS_PLACEMENTS}, got {eps_placement!r}")
    B, L, _ = x.shape
    N = scores.shape[-1]
    scores = scores.transpose(1, 2)  # [B, N, L]
    if lengths is not None:
        valid = valid_frames(lengths.to(x.device), L)  # [B, L]
        x = zero_padded_frames(x, lengths)
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    a = torch.softmax(scores, dim=-1)
    v = torch.bmm(a, x)  # [B, N, F]
    if shift:
        u = alpha[:, None] * v + beta[:, None]
        if eps_placement == "sqrt":
            norm = torch.sqrt((u * u).sum(-1, keepdim=True) + eps)
        else:
            norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(eps)
        v = u / (math.sqrt(N) * norm)
    return v.reshape(B, N * x.shape[2]), a


def attention_cluster(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    alpha: Tensor,
    beta: Tensor,
    lengths: Tensor | None = None,
    *,
    attention: str = "fc1",
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    shift: bool = True,
    eps: float = 1e-12,
    eps_placement: str = "clamp",
) -> tuple[Tensor, Tensor]:
    """Attention cluster of N units over the frames of ``x``.

    Returns (out ``[B, N*F]``, attention ``[B, N, L]``).
    """
    # padded frames reach neither the scores nor (attention_cluster_op) the pooling
    scores = attention_scores(zero_padded_frames(x, lengths), weight, bias, attention, weight1,
                              bias1, alpha.shape[0])
    return attention_cluster_op(x, scores, lengths, alpha, beta, shift, eps, eps_placement)


def init_attention_cluster_(module: nn.Module) -> None:
    """Initialisation of the official code: alpha, beta ~ N(0, N^-1/4), Kaiming weights."""
    n = module.num_units
    with torch.no_grad():
        std = n ** -0.25
        module.alpha.normal_(0.0, std)
        module.beta.normal_(0.0, std)
        if module.weight is not None:
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            module.bias.uniform_(-0.01, 0.01)
        if module.weight1 is not None:
            nn.init.kaiming_normal_(module.weight1, nonlinearity="relu")
            module.bias1.uniform_(-0.01, 0.01)


class AttentionCluster(nn.Module):
    """Reference attention cluster; same parameters and state_dict keys as
    :class:`attnpool.AttentionCluster`."""

    ATTENTIONS = ("fc1", "fc2", "average")

    def __init__(
        self,
        in_features: int,
        num_units: int,
        *,
        attention: str = "fc1",
        hidden_features: int | None = None,
        shift: bool = True,
        eps: float = 1e-12,
        eps_placement: str = "clamp",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if attention not in self.ATTENTIONS:
            raise ValueError(f"attention must be one of {self.ATTENTIONS}, got {attention!r}")
        if eps_placement not in EPS_PLACEMENTS:
            raise ValueError(f"eps_placement must be one of {EPS_PLACEMENTS}, "
                             f"got {eps_placement!r}")
        if in_features < 1 or num_units < 1:
            raise ValueError(
                f"in_features and num_units must be >= 1, got {in_features}, {num_units}"
            )
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_units = num_units
        self.attention = attention
        self.shift = shift
        self.eps = eps
        self.eps_placement = eps_placement
        self.hidden_features = None
        self.weight1 = self.bias1 = None
        key_features = in_features
        if attention == "fc2":
            self.hidden_features = hidden_features or in_features
            key_features = self.hidden_features
            self.weight1 = nn.Parameter(torch.empty(self.hidden_features, in_features, **kw))
            self.bias1 = nn.Parameter(torch.empty(self.hidden_features, **kw))
        self.weight = self.bias = None
        if attention != "average":
            self.weight = nn.Parameter(torch.empty(num_units, key_features, **kw))
            # Shifts every frame's score of a unit alike, so the softmax cancels
            # it: kept for checkpoint compatibility with the official code.
            self.bias = nn.Parameter(torch.empty(num_units, **kw))
        self.alpha = nn.Parameter(torch.empty(num_units, **kw))
        self.beta = nn.Parameter(torch.empty(num_units, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_attention_cluster_(self)

    @property
    def out_features(self) -> int:
        return self.num_units * self.in_features

    def extra_repr(self) -> str:
        placement = "" if self.eps_placement == "clamp" else f", eps_placement={self.eps_placement!r}"
        return (
            f"in_features={self.in_features}, num_units={self.num_units}, "
            f"attention={self.attention!r}, shift={self.shift}{placement}"
        )

    @classmethod
    def from_official(cls, state_dict, source: str, *, prefix: str = "", **kwargs):
        """A cluster holding the weights of an official checkpoint, computing what the official
        module computes: ``source="flash-mnist"`` (the first author's PyTorch
        ``ShiftingAttention``), ``"paddle"`` (PaddlePaddle's ``ShiftingAttentionModel``) or
        ``"mindspore"`` (the MindSpore port, fc1 or fc2). See :mod:`attnpool.official`."""
        return official.attention_cluster(cls, state_dict, source, prefix=prefix, **kwargs)

    def forward(self, x: Tensor, lengths: Tensor | None = None, return_attention: bool = False):
        out, a = attention_cluster(
            x, self.weight, self.bias, self.alpha, self.beta, lengths,
            attention=self.attention, weight1=self.weight1, bias1=self.bias1,
            shift=self.shift, eps=self.eps, eps_placement=self.eps_placement,
        )
        return (out, a) if return_attention else out


class MultimodalAttentionClusters(nn.Module):
    """One attention cluster per modality; outputs concatenated in the dict's order.

    ``modalities`` maps a name to ``(in_features, num_units)``; keyword arguments go
    to every cluster. ``forward(inputs, lengths=None)`` takes a dict of ``[B, L_m, F_m]``
    tensors (and optionally a dict of lengths) and returns ``[B, Σ_m N_m·F_m]``.
    """

    cluster_class = AttentionCluster

    def __init__(self, modalities: dict[str, tuple[int, int]], **cluster_kwargs) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("modalities must name at least one (in_features, num_units) pair")
        self.clusters = nn.ModuleDict(
            {name: self.cluster_class(f, n, **cluster_kwargs) for name, (f, n) in modalities.items()}
        )

    @property
    def out_features(self) -> int:
        return sum(c.out_features for c in self.clusters.values())

    @classmethod
    def from_official(cls, state_dict, source: str = "paddle", *,
                      modalities: tuple[str, ...] = ("rgb", "audio"), **cluster_kwargs):
        """PaddlePaddle's multimodal attention cluster: its clusters ``satt0``, ``satt1``, ...
        become the clusters named ``modalities`` (in that order). See :mod:`attnpool.official`."""
        return official.multimodal_attention_clusters(cls, state_dict, source,
                                                      modalities=modalities, **cluster_kwargs)

    def forward(self, inputs: dict[str, Tensor], lengths: dict[str, Tensor] | None = None) -> Tensor:
        missing = set(self.clusters) - set(inputs)
        if missing:
            raise ValueError(f"inputs lacks modalities {sorted(missing)}; expected {list(self.clusters)}")
        lengths = lengths or {}
        return torch.cat(
            [c(inputs[name], lengths.get(name)) for name, c in self.clusters.items()], dim=-1
        )


# --------------------------------------------------------------------------
# Attentional pooling (Girdhar & Ramanan, NeurIPS 2017), docs/design.md "Attentional pooling"
# --------------------------------------------------------------------------
def attentional_pooling(
    x: Tensor,
    weight_bottom_up: Tensor,
    bias_bottom_up: Tensor | None,
    weight_top_down: Tensor,
    bias_top_down: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Rank-P attentional pooling in the paper's form (materialises the top-down maps).

    x ``[B, C, H, W]`` or a clip ``[B, T, C, H, W]`` (per-frame scores averaged over T).
    Returns (logits ``[B, K]``, bottom-up maps ``[B, (T,) P, H, W]``).
    """
    return _bilinear_pooling(x, x, weight_bottom_up, bias_bottom_up, weight_top_down,
                             bias_top_down)


def _bilinear_pooling(x, q, weight_bottom_up, bias_bottom_up, weight_top_down, bias_top_down):
    """The paper's form with the bottom-up maps computed from q (x itself, or the pose
    pre-logits) and the top-down maps from x."""
    D, H, W = q.shape[-3:]
    lead = x.shape[:-3]
    h = torch.einsum("pd,bdn->bpn", weight_bottom_up, q.reshape(-1, D, H * W))  # bottom-up
    if bias_bottom_up is not None:
        h = h + bias_bottom_up[:, None]
    t = torch.einsum("pkc,bcn->bpkn", weight_top_down, x.reshape(-1, x.shape[-3], H * W))
    if bias_top_down is not None:  # top-down, one map per class
        t = t + bias_top_down[..., None]
    logits = (h[:, :, None, :] * t).mean(-1).sum(1)  # mean over positions, ranks summed
    if x.dim() == 5:
        logits = logits.reshape(*lead, logits.shape[-1]).mean(1)
    return logits, h.reshape(*lead, h.shape[1], H, W)


def attentional_pooling_op(x: Tensor, weight_bottom_up: Tensor, bias_bottom_up: Tensor | None
                           ) -> tuple[Tensor, Tensor]:
    """The factored core the fused kernels compute: x ``[B, C, n]`` ->
    (z ``[B, P, C]`` = (1/n) Σ_i h[p,i]·x_i, bottom-up maps h ``[B, P, n]``)."""
    h = torch.einsum("pc,bcn->bpn", weight_bottom_up, x)
    if bias_bottom_up is not None:
        h = h + bias_bottom_up[:, None]
    z = torch.einsum("bpn,bcn->bpc", h, x) / x.shape[-1]
    return z, h


def pose_prelogits(x: Tensor, pose_weight: Tensor, pose_bias: Tensor) -> Tensor:
    """The pose-regularised variant's 1×1 conv + ReLU over the channels of x
    ``[B, (T,) C, H, W]`` -> ``[B, (T,) D, H, W]``."""
    return torch.relu(torch.einsum("dc,...chw->...dhw", pose_weight, x)
                      + pose_bias[:, None, None])


def keypoint_heatmaps(q: Tensor, heatmap_weight: Tensor, heatmap_bias: Tensor) -> Tensor:
    """1×1 conv of the pose pre-logits ``[B, (T,) D, H, W]`` -> heatmaps ``[B, (T,) J, H, W]``."""
    return torch.einsum("jd,...dhw->...jhw", heatmap_weight, q) + heatmap_bias[:, None, None]


def pose_attentional_pooling(
    x: Tensor, q: Tensor, weight_bottom_up: Tensor, bias_bottom_up: Tensor | None,
    weight_top_down: Tensor, bias_top_down: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Attentional pooling whose bottom-up maps come from the pose pre-logits q
    ``[B, (T,) D, H, W]`` (weight_bottom_up ``[P, D]``) and top-down maps from x (paper form)."""
    return _bilinear_pooling(x, q, weight_bottom_up, bias_bottom_up, weight_top_down,
                             bias_top_down)


class AttentionalPooling(nn.Module):
    """Reference attentional pooling; same parameters and state_dict keys as
    :class:`attnpool.AttentionalPooling`. A drop-in for avgpool + flatten + Linear.

    ``top_down_dropout``: dropout (probability p, in training only) of the features feeding
    the top-down maps, as the official graph does (keep 0.2: p = 0.8); the bottom-up maps see
    the features unchanged. ``pose_init="official"``: the official pose branch's init
    (pose layer N(0, 0.001)) instead of Kaiming-normal."""

    POSE_INITS = ("kaiming", "official")

    def __init__(self, in_channels: int, num_classes: int, *, rank: int = 1, bias: bool = True,
                 pose_keypoints: int | None = None, pose_channels: int = 256,
                 pose_init: str = "kaiming", top_down_dropout: float = 0.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if min(in_channels, num_classes, rank) < 1:
            raise ValueError(f"in_channels, num_classes and rank must be >= 1, got "
                             f"{in_channels}, {num_classes}, {rank}")
        if pose_keypoints is not None and min(pose_keypoints, pose_channels) < 1:
            raise ValueError(f"pose_keypoints and pose_channels must be >= 1, got "
                             f"{pose_keypoints}, {pose_channels}")
        if pose_init not in self.POSE_INITS:
            raise ValueError(f"pose_init must be one of {self.POSE_INITS}, got {pose_init!r}")
        if not 0.0 <= top_down_dropout < 1.0:
            raise ValueError(f"top_down_dropout must lie in [0, 1), got {top_down_dropout}")
        kw = {"device": device, "dtype": dtype}
        self.in_channels, self.num_classes, self.rank = in_channels, num_classes, rank
        self.pose_keypoints, self.pose_init = pose_keypoints, pose_init
        self.top_down_dropout = float(top_down_dropout)
        bottom_up_in = in_channels
        if pose_keypoints is not None:  # Girdhar's pose-regularised model
            bottom_up_in = pose_channels
            self.pose_weight = nn.Parameter(torch.empty(pose_channels, in_channels, **kw))
            self.pose_bias = nn.Parameter(torch.empty(pose_channels, **kw))
            self.heatmap_weight = nn.Parameter(torch.empty(pose_keypoints, pose_channels, **kw))
            self.heatmap_bias = nn.Parameter(torch.empty(pose_keypoints, **kw))
        self.weight_bottom_up = nn.Parameter(torch.empty(rank, bottom_up_in, **kw))
        self.weight_top_down = nn.Parameter(torch.empty(rank, num_classes, in_channels, **kw))
        self.bias_bottom_up = self.bias_top_down = None
        if bias:
            self.bias_bottom_up = nn.Parameter(torch.empty(rank, **kw))
            self.bias_top_down = nn.Parameter(torch.empty(rank, num_classes, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: weights N(0, 0.001), biases 0. The pose layers: Kaiming-normal, biases
        0; with ``pose_init="official"`` the pose layer N(0, 0.001) as the official graph (its
        heatmap layer takes the backbone's default, He init for ResNet: Kaiming-normal here)."""
        with torch.no_grad():
            self.weight_bottom_up.normal_(0.0, 0.001)
            self.weight_top_down.normal_(0.0, 0.001)
            if self.bias_bottom_up is not None:
                self.bias_bottom_up.zero_()
                self.bias_top_down.zero_()
            if self.pose_keypoints is not None:
                for w, b in ((self.pose_weight, self.pose_bias),
                             (self.heatmap_weight, self.heatmap_bias)):
                    nn.init.kaiming_normal_(w)
                    b.zero_()
                if self.pose_init == "official":
                    self.pose_weight.normal_(0.0, 0.001)

    def extra_repr(self) -> str:
        pose = "" if self.pose_keypoints is None else f", pose_keypoints={self.pose_keypoints}"
        drop = f", top_down_dropout={self.top_down_dropout}" if self.top_down_dropout else ""
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"rank={self.rank}, bias={self.bias_bottom_up is not None}{pose}{drop}")

    @classmethod
    def from_official(cls, variables, *, pose: bool = False, scope: str = "", **kwargs):
        """The attention head of Girdhar's TensorFlow graph (``PosePrelogitsBasedAttention``,
        and with ``pose=True`` the ``PoseLogits`` branch) from its variables, name -> numpy
        array as TensorFlow's checkpoint reader returns them. See :mod:`attnpool.official`."""
        return official.attentional_pooling(cls, variables, pose=pose, scope=scope, **kwargs)

    def _pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return attentional_pooling(x, self.weight_bottom_up, self.bias_bottom_up,
                                   self.weight_top_down, self.bias_top_down)

    def _pose_pool(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        return pose_attentional_pooling(x, q, self.weight_bottom_up, self.bias_bottom_up,
                                        self.weight_top_down, self.bias_top_down)

    def forward(self, x: Tensor, return_maps: bool = False, return_heatmaps: bool = False):
        """x ``[B, C, H, W]`` or ``[B, T, C, H, W]`` -> logits ``[B, K]``; with return_maps
        also the bottom-up maps ``[B, (T,) P, H, W]``; with return_heatmaps (pose variant)
        also the keypoint heatmaps ``[B, (T,) J, H, W]`` (train them with :meth:`pose_loss`)."""
        # the official dropout: on the top-down path only (the bottom-up maps see x unchanged)
        dropout = self.training and self.top_down_dropout > 0
        if self.pose_keypoints is None:
            if return_heatmaps:
                raise ValueError("return_heatmaps needs the pose variant (pose_keypoints=J)")
            if dropout:  # bottom-up maps from x, top-down maps from the dropped-out x
                logits, maps = self._pose_pool(F.dropout(x, self.top_down_dropout), x)
            else:
                logits, maps = self._pool(x)
            heatmaps = None
        else:
            if x.dim() not in (4, 5) or x.shape[-3] != self.in_channels:
                raise ValueError(f"x must have shape [B, {self.in_channels}, H, W] or "
                                 f"[B, T, {self.in_channels}, H, W], got {list(x.shape)}")
            q = pose_prelogits(x, self.pose_weight, self.pose_bias)
            top_down = F.dropout(x, self.top_down_dropout) if dropout else x
            logits, maps = self._pose_pool(top_down, q)
            heatmaps = keypoint_heatmaps(q, self.heatmap_weight, self.heatmap_bias)
        out = (logits,) + ((maps,) if return_maps else ()) + ((heatmaps,) if return_heatmaps else ())
        return out if len(out) > 1 else logits

    @staticmethod
    def pose_loss(heatmaps: Tensor, target: Tensor, valid: Tensor | None = None, *,
                  official: bool = False) -> Tensor:
        """MSE between predicted and target keypoint heatmaps ``[B, (T,) J, H, W]`` (the pose
        regulariser).

        ``valid`` (bool ``[B, (T,) J]``, optional): keypoints without a label add nothing (they
        still count in the mean, as in the official loss). ``official=True``: the official
        TensorFlow loss, 0.5·J/n times that mean, n = number of heatmap images (B, or B·T):
        per keypoint the batch mean of 0.5·Σ_{i,j} (target − heatmap)² / (n·H·W), summed
        over keypoints."""
        if heatmaps.shape != target.shape:
            raise ValueError(f"target must have the heatmaps' shape {list(heatmaps.shape)}, "
                             f"got {list(target.shape)}")
        if valid is None and not official:
            return torch.nn.functional.mse_loss(heatmaps, target)
        sq = (heatmaps - target).square()
        if valid is not None:
            if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
                raise TypeError(f"valid must be a bool Tensor of shape {list(heatmaps.shape[:-2])}")
            if valid.shape != heatmaps.shape[:-2]:
                raise ValueError(f"valid must have shape {list(heatmaps.shape[:-2])} (the heatmaps' "
                                 f"[B, (T,) J]), got {list(valid.shape)}")
            sq = torch.where(valid[..., None, None], sq, 0)
        loss = sq.mean()
        if official:
            J, images = heatmaps.shape[-3], heatmaps[..., 0, 0, 0].numel()
            loss = loss * (0.5 * J / images)
        return loss


def weighted_pool(x: Tensor, h: Tensor) -> Tensor:
    """Spatial pooling of x ``[B, C, n]`` under P given maps h ``[B, P, n]``:
    z ``[B, P, C]`` = (1/n) Σ_i h[:, p, i]·x[:, :, i]. The core of attentional pooling with
    the bottom-up maps supplied (pose variant), and of the masked frame means of spatio-temporal attention."""
    return torch.einsum("bpn,bcn->bpc", h, x) / x.shape[-1]


# --------------------------------------------------------------------------
# Spatio-temporal attention (Meng et al., ICLR 2019), docs/design.md "Spatio-temporal attention"
# --------------------------------------------------------------------------
def _reduce(terms: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":  # of no terms (T < 3 for unimodality): 0, not NaN
        return terms.sum() / max(terms.numel(), 1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def total_variation(mask: Tensor, reduction: str = "sum") -> Tensor:
    """Anisotropic total variation of the spatial masks ``[B, T, H, W]``: Σ |vertical
    differences| + Σ |horizontal differences| per map, summed (or averaged) over the B·T maps."""
    tv = (mask[..., 1:, :] - mask[..., :-1, :]).abs().sum((-2, -1)) + \
        (mask[..., :, 1:] - mask[..., :, :-1]).abs().sum((-2, -1))
    return _reduce(tv, reduction)


def mask_contrast(mask: Tensor) -> Tensor:
    """(1/B) Σ ½·M·1{M<0.5} − ½·M·1{M>0.5}: pushes mask values away from 0.5
    (the indicators are constants for the gradient)."""
    low = (mask < 0.5).to(mask.dtype)
    high = (mask > 0.5).to(mask.dtype)
    return (0.5 * mask * low - 0.5 * mask * high).sum() / max(mask.shape[0], 1)


def unimodality(w: Tensor, sqrt: bool = True, reduction: str = "mean") -> Tensor:
    """Temporal weights ``[B, T]``: r_t = relu(w[t-1]·w[t+1] − w[t]²) for t = 1..T-2 (the
    official code takes sqrt(r_t); the paper does not), reduced over b and t."""
    r = torch.relu(w[:, :-2] * w[:, 2:] - w[:, 1:-1] ** 2)
    if sqrt:
        r = torch.sqrt(r)
    return _reduce(r, reduction)


def st_regularizer(mask: Tensor, w: Tensor, tv_weight: float = 1e-5,
                   contrast_weight: float = 1e-4, unimodal_weight: float = 1.0, *,
                   sqrt: bool = True, tv_reduction: str = "sum",
                   unimodal_reduction: str = "mean") -> Tensor:
    """The three regularisers of Meng et al., weighted and summed (official defaults)."""
    return (tv_weight * total_variation(mask, tv_reduction)
            + contrast_weight * mask_contrast(mask)
            + unimodal_weight * unimodality(w, sqrt, unimodal_reduction))


def masked_frame_means(x: Tensor, mask: Tensor) -> Tensor:
    """x ``[B, T, C, H, W]``, mask ``[B, T, H, W]`` -> mean_{i,j}(mask_t ⊙ x_t) ``[B, T, C]``."""
    return (x * mask[:, :, None]).mean((-2, -1))


def temporal_attention_pool(x: Tensor, mask: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """w = softmax_T(scores) ``[B, T]``; pooled ``[B, C]`` = Σ_t w_t · mean_{i,j}(mask_t ⊙ x_t).
    Returns (pooled, w)."""
    w = torch.softmax(scores, dim=1)
    return torch.einsum("bt,btc->bc", w, masked_frame_means(x, mask)), w


class SpatioTemporalRegularizer(nn.Module):
    """Reference regulariser of Meng et al.: ``forward(mask [B, T, H, W], w [B, T])`` ->
    tv_weight·TV + contrast_weight·contrast + unimodal_weight·unimodality (a scalar)."""

    def __init__(self, tv_weight: float = 1e-5, contrast_weight: float = 1e-4,
                 unimodal_weight: float = 1.0, *, sqrt: bool = True, tv_reduction: str = "sum",
                 unimodal_reduction: str = "mean") -> None:
        super().__init__()
        for name, r in (("tv_reduction", tv_reduction), ("unimodal_reduction", unimodal_reduction)):
            if r not in ("sum", "mean"):
                raise ValueError(f"{name} must be 'sum' or 'mean', got {r!r}")
        self.tv_weight, self.contrast_weight = float(tv_weight), float(contrast_weight)
        self.unimodal_weight, self.sqrt = float(unimodal_weight), sqrt
        self.tv_reduction, self.unimodal_reduction = tv_reduction, unimodal_reduction

    def extra_repr(self) -> str:
        return (f"tv_weight={self.tv_weight}, contrast_weight={self.contrast_weight}, "
                f"unimodal_weight={self.unimodal_weight}, sqrt={self.sqrt}")

    def forward(self, mask: Tensor, w: Tensor) -> Tensor:
        return st_regularizer(mask, w, self.tv_weight, self.contrast_weight, self.unimodal_weight,
                              sqrt=self.sqrt, tv_reduction=self.tv_reduction,
                              unimodal_reduction=self.unimodal_reduction)


class ConvLSTM(nn.Module):
    """One-layer convolutional LSTM over the frames of x ``[B, T, C, H, W]`` -> the hidden
    states ``[B, T, hidden, H, W]``, from a zero state: the official temporal model of Meng et
    al. One convolution of [x_t, h_{t-1}] gives the gates in the order i, f, o, g:
    c_t = σ(f)·c_{t-1} + σ(i)·tanh(g), h_t = σ(o)·tanh(c_t). Parameters ``conv.weight
    [4·hidden, C + hidden, k, k]``, ``conv.bias [4·hidden]``."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        if min(in_channels, hidden_channels) < 1 or kernel_size % 2 != 1:
            raise ValueError(f"in_channels and hidden_channels must be >= 1 and kernel_size odd, "
                             f"got {in_channels}, {hidden_channels}, {kernel_size}")
        self.in_channels, self.hidden_channels = in_channels, hidden_channels
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                              padding=kernel_size // 2, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _, H, W = x.shape
        h = c = x.new_zeros(B, self.hidden_channels, H, W)
        hidden = []
        for t in range(T):
            i, f, o, g = self.conv(torch.cat([x[:, t], h], dim=1)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hidden.append(h)
        return torch.stack(hidden, dim=1)


class SpatioTemporalAttention(nn.Module):
    """Reference spatio-temporal attention (Meng et al.): the official mask network (three
    3×3 convs with BN + ReLU, sigmoid), a temporal scorer, softmax over frames, the weighted
    sum; and the regulariser as ``.regularizer(mask, w)``. Same state_dict as
    :class:`attnpool.SpatioTemporalAttention`.

    ``temporal="linear"`` (default): the scorer is linear on the masked, spatially averaged
    frame features, which are pooled (``[B, C]``). ``temporal="convlstm"``: the official model,
    a :class:`ConvLSTM` (C -> ``temporal_hidden``) over the masked features, the scorer linear on
    its outputs' spatial means, which are pooled (``[B, temporal_hidden]``). ``dropout``: the
    official input dropout (0.2), in training only: each channel of a clip is zeroed for all
    its frames alike (``nn.Dropout2d`` on the official ``[B, C, T, H, W]`` layout).

    ``forward(x [B, T, C, H, W], return_attention=False)`` -> pooled ``[B, out_features]``
    (and the masks ``[B, T, H, W]`` and temporal weights ``[B, T]`` with return_attention).
    """

    regularizer_class = SpatioTemporalRegularizer
    TEMPORALS = ("linear", "convlstm")

    def __init__(self, in_channels: int, mask_hidden: tuple[int, int] = (1024, 512), *,
                 temporal: str = "linear", temporal_hidden: int = 512, dropout: float = 0.0,
                 tv_weight: float = 1e-5, contrast_weight: float = 1e-4,
                 unimodal_weight: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        if in_channels < 1 or len(mask_hidden) != 2 or min(mask_hidden) < 1:
            raise ValueError(f"in_channels must be >= 1 and mask_hidden two sizes >= 1, got "
                             f"{in_channels}, {mask_hidden}")
        if temporal not in self.TEMPORALS:
            raise ValueError(f"temporal must be one of {self.TEMPORALS}, got {temporal!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        kw = {"device": device, "dtype": dtype}
        h1, h2 = mask_hidden
        self.in_channels, self.temporal, self.dropout = in_channels, temporal, float(dropout)
        # the official layers: convolutions without bias (BN follows the first two)
        self.mask_net = nn.Sequential(
            nn.Conv2d(in_channels, h1, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(h1, **kw),
            nn.ReLU(),
            nn.Conv2d(h1, h2, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(h2, **kw), nn.ReLU(),
            nn.Conv2d(h2, 1, 3, padding=1, bias=False, **kw), nn.Sigmoid(),
        )
        if temporal == "convlstm":
            self.convlstm = ConvLSTM(in_channels, temporal_hidden, **kw)
            self.temporal_scorer = nn.Linear(temporal_hidden, 1, **kw)
        else:
            self.temporal_scorer = nn.Linear(in_channels, 1, **kw)
        self.regularizer = self.regularizer_class(tv_weight, contrast_weight, unimodal_weight)

    @property
    def out_features(self) -> int:
        return self.temporal_scorer.in_features

    def extra_repr(self) -> str:
        drop = f", dropout={self.dropout}" if self.dropout else ""
        return f"in_channels={self.in_channels}, temporal={self.temporal!r}{drop}"

    @classmethod
    def from_official(cls, state_dict, **kwargs):
        """Meng et al.'s official model (``Action_Att_LSTM``: mask network, ConvLSTM,
        ``fc_attention``) from its PyTorch state_dict; ``temporal="convlstm"``, ``dropout=0.2``.
        Its classifier ``fc`` is not part of this module. See :mod:`attnpool.official`."""
        return official.spatiotemporal_attention(cls, state_dict, **kwargs)

    def _frame_means(self, x: Tensor, mask: Tensor) -> Tensor:
        return masked_frame_means(x, mask)

    def forward(self, x: Tensor, return_attention: bool = False):
        if x.dim() != 5 or x.shape[2] != self.in_channels:
            raise ValueError(f"x must have shape [B, T, {self.in_channels}, H, W], "
                             f"got {list(x.shape)}")
        B, T, C, H, W = x.shape
        if self.training and self.dropout > 0:
            # nn.Dropout2d's noise on [B, C, T, H, W] (same draws): one per (clip, channel)
            keep = x.new_empty(B, 1, C, 1, 1).bernoulli_(1 - self.dropout) / (1 - self.dropout)
            x = x * keep
        mask = self.mask_net(x.reshape(B * T, C, H, W)).reshape(B, T, H, W)
        if self.temporal == "convlstm":
            f = self.convlstm(x * mask[:, :, None]).mean((-2, -1))   # [B, T, hidden]
        else:
            f = self._frame_means(x, mask)                   # [B, T, C]
        w = torch.softmax(self.temporal_scorer(f).squeeze(-1), dim=1)
        pooled = torch.einsum("bt,btc->bc", w, f)
        return (pooled, mask, w) if return_attention else pooled


# --------------------------------------------------------------------------
# Interaction-aware pyramid attention (Du et al., ECCV 2018), docs/design.md "Pyramid
# attention" — our formulation: the paper's equations were not available, see the README.
# --------------------------------------------------------------------------
def pyramid_pool(maps: list[Tensor]) -> list[Tensor]:
    """R: each map [B, C_s, H_s, W_s] (or clips [B, T, C_s, H_s, W_s]) adaptively
    average-pooled to the last map's H×W -> [B, C_s, n], n = (T·)H·W, frame-major."""
    Ho, Wo = maps[-1].shape[-2:]
    pooled = []
    for x in maps:
        frames = x.flatten(0, 1) if x.dim() == 5 else x          # [B·T, C, H, W]
        r = F.adaptive_avg_pool2d(frames, (Ho, Wo))
        if x.dim() == 5:
            r = r.unflatten(0, x.shape[:2]).transpose(1, 2)      # [B, C, T, Ho, Wo]
        pooled.append(r.flatten(2))
    return pooled


def pyramid_attention(maps: list[Tensor], score_weights: list[Tensor], score_bias: Tensor,
                      eps: float = 1e-12, diversity_weight: float = 1.0
                      ) -> tuple[Tensor, Tensor]:
    """-> (out [B, Σ C_s], loss): fused attention over the pooled pyramid and the
    PCA-guided + diversity loss, averaged over the batch (docs/design.md "Pyramid attention")."""
    pooled = pyramid_pool(maps)                                           # R(X_s) [B, C_s, n]
    scores = [torch.einsum("bcn,c->bn", p, w) + b                          # y_s [B, n]
              for p, w, b in zip(pooled, score_weights, score_bias)]
    a = torch.softmax(torch.stack(scores).sum(0), dim=1)                  # fused attention
    out = torch.cat([torch.einsum("bcn,bn->bc", p, a) for p in pooled], dim=1)
    unit = [F.normalize(y, dim=1, eps=eps) for y in scores]               # ŷ_s
    # PCA guidance: the variance each channel's centred map shows along ŷ_s
    variance = sum(torch.einsum("bcn,bn->bc", p - p.mean(2, keepdim=True), u).pow(2).sum(1)
                   / p.shape[1] for p, u in zip(pooled, unit)) / len(pooled)
    # diversity: levels orthogonal to each other (off-diagonal of Ŷ Ŷᵀ)
    Y = torch.stack(unit, dim=1)                                          # [B, S, n]
    gram = Y @ Y.transpose(1, 2)
    off_diagonal = 1 - torch.eye(len(pooled), dtype=gram.dtype, device=gram.device)
    overlap = (gram.pow(2) * off_diagonal).sum((1, 2))
    loss = (diversity_weight * overlap - variance).mean()
    return out, loss


def check_pyramid_maps(maps, in_channels: list[int]) -> None:
    """ValueError / TypeError naming the map and the expected shape (docs/design.md, "Bad
    input"): one map per level, all ``[B, C_s, H_s, W_s]`` or all ``[B, T, C_s, H_s, W_s]``,
    one dtype and device."""
    S = len(in_channels)
    if isinstance(maps, Tensor) or not isinstance(maps, (list, tuple)):
        raise TypeError(f"maps must be a list of {S} tensors, got {type(maps).__name__}")
    if len(maps) != S:
        raise ValueError(f"maps must hold {S} levels, got {len(maps)}")
    first = maps[0]
    if not isinstance(first, Tensor):
        raise TypeError("maps[0] must be a Tensor [B, C, H, W] or [B, T, C, H, W], got "
                        f"{type(first).__name__}")
    if first.dim() not in (4, 5):
        raise ValueError("maps[0] must be [B, C, H, W] or [B, T, C, H, W], got "
                         f"{list(getattr(first, 'shape', [])) or type(first).__name__}")
    lead = list(first.shape[:first.dim() - 3])
    for s, (x, c) in enumerate(zip(maps, in_channels)):
        # the message is built only to raise: under torch.compile the sizes are symbolic
        def want(c=c):
            return "[" + ", ".join([str(d) for d in lead] + [str(c), "H", "W"]) + "]"
        if not isinstance(x, Tensor):
            raise TypeError(f"maps[{s}] must be a Tensor of shape {want()}, got {type(x).__name__}")
        if x.dim() != first.dim() or list(x.shape[:x.dim() - 3]) != lead or x.shape[-3] != c:
            raise ValueError(f"maps[{s}] must have shape {want()}, got {list(x.shape)}")
        if any(s < 1 for s in x.shape[-2:]) or (x.dim() == 5 and x.shape[1] < 1):
            raise ValueError(f"maps[{s}] must have T, H, W >= 1, got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"maps[{s}] must be a floating-point tensor of shape {want()}, "
                            f"got {x.dtype}")
        if x.dtype != first.dtype:
            raise TypeError(f"maps[{s}] must have maps[0]'s dtype {first.dtype}, got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"maps[{s}] must be on maps[0]'s device {first.device}, got {x.device}")


class PyramidAttention(nn.Module):
    """Reference interaction-aware pyramid attention (our formulation of Du et al.).

    ``forward(maps, return_loss=False)``: maps, one per level, ``[B, C_s, H_s, W_s]`` or
    clips ``[B, T, C_s, H_s, W_s]``; the last map's H×W is the common scale. Returns
    ``out [B, Σ C_s]`` (and the loss with ``return_loss=True``). Parameters
    ``score_weights`` (level s: ``[C_s]``) and ``score_bias [S]``.
    """

    def __init__(self, in_channels: list[int], eps: float = 1e-12, diversity_weight: float = 1.0,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels or min(in_channels) < 1:
            raise ValueError(f"in_channels must be a non-empty list of sizes >= 1, got {in_channels}")
        kw = {"device": device, "dtype": dtype}
        self.in_channels, self.eps, self.diversity_weight = in_channels, float(eps), float(diversity_weight)
        self.score_weights = nn.ParameterList([nn.Parameter(torch.empty(c, **kw)) for c in in_channels])
        self.score_bias = nn.Parameter(torch.empty(len(in_channels), **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # as nn.Linear(C_s, 1) per level
        for s, (w, c) in enumerate(zip(self.score_weights, self.in_channels)):
            nn.init.uniform_(w, -1 / math.sqrt(c), 1 / math.sqrt(c))
            with torch.no_grad():
                self.score_bias[s].uniform_(-1 / math.sqrt(c), 1 / math.sqrt(c))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, eps={self.eps}, diversity_weight={self.diversity_weight}"

    @property
    def out_features(self) -> int:
        return sum(self.in_channels)

    def forward(self, maps: list[Tensor], return_loss: bool = False):
        check_pyramid_maps(maps, self.in_channels)
        out, loss = pyramid_attention(list(maps), list(self.score_weights), self.score_bias,
                                      self.eps, self.diversity_weight)
        return (out, loss) if return_loss else out
