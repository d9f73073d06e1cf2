"""Spatio-temporal attention (Meng et al., "Where and When to Look?"; docs/design.md,
"Spatio-temporal attention"): the op ``attnpool::st_regularizer`` (total variation + contrast
of the masks and unimodality of the temporal weights, one fused kernel forward and backward,
with its backward op), the functional regulariser and its single-term losses, the temporal
attention pool (a composition over :mod:`attnpool.weighted_pool`) and the modules.

The op's reference is :func:`attnpool.reference.st_regularizer`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnpool import _ops, backends, reference
from attnpool.weighted_pool import check_clip, masked_frame_means

__all__ = [
    "SpatioTemporalAttention", "SpatioTemporalRegularizer", "mask_contrast", "st_regularizer",
    "temporal_attention_pool", "total_variation", "unimodality",
]

# No backend limits beyond the backends' own (device, Triton interpreter dtypes).
_ops.register_kernels("st_regularizer")


def _triton_st_regularizer(mask: Tensor, w: Tensor, tv_weight: float, contrast_weight: float,
                   unimodal_weight: float, sqrt: bool, tv_mean: bool, unimodal_mean: bool,
                   backend: str) -> Tensor:
    """Total variation + contrast of mask [B, T, H, W] and unimodality of w [B, T], weighted
    and summed, in one fused kernel -> a 0-dim tensor."""
    if mask.shape[0] == 0:
        return mask.new_zeros(())
    impl = backends.implementation("st_regularizer", "triton")
    return impl.forward(mask.contiguous(), w.contiguous(), tv_weight, contrast_weight,
                        unimodal_weight, sqrt, tv_mean, unimodal_mean)


st_regularizer_op = _ops.Op("st_regularizer", _triton_st_regularizer)


@st_regularizer_op.register_fake
def _(mask, w, tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean, unimodal_mean,
      backend):
    return mask.new_empty(())


def _triton_st_regularizer_backward(grad_total: Tensor, mask: Tensor, w: Tensor, tv_weight: float,
                            contrast_weight: float, unimodal_weight: float, sqrt: bool,
                            tv_mean: bool, unimodal_mean: bool, backend: str
                            ) -> tuple[Tensor, Tensor]:
    """Gradients of st_regularizer w.r.t. mask and w (one fused kernel)."""
    if mask.shape[0] == 0:
        return torch.zeros_like(mask), torch.zeros_like(w)
    impl = backends.implementation("st_regularizer", "triton")
    return impl.backward(grad_total.contiguous(), mask.contiguous(), w.contiguous(), tv_weight,
                         contrast_weight, unimodal_weight, sqrt, tv_mean, unimodal_mean)


st_regularizer_backward = _ops.Op("st_regularizer_backward", _triton_st_regularizer_backward)


@st_regularizer_backward.register_fake
def _(grad_total, mask, w, tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean,
      unimodal_mean, backend):
    return (torch.empty_like(mask, memory_format=torch.contiguous_format),
            torch.empty_like(w, memory_format=torch.contiguous_format))


def _streg_setup(ctx, inputs, output):
    mask, w, *params = inputs
    ctx.save_for_backward(mask, w)
    ctx.params = params


def _streg_backward(ctx, grad_total):
    mask, w = ctx.saved_tensors
    grad_mask, grad_w = _ops.backward_op(st_regularizer_backward)(grad_total, mask, w, *ctx.params)
    return (grad_mask, grad_w) + (None,) * len(ctx.params)


_ops.register_autograd(st_regularizer_op, _streg_backward, _streg_setup)
_ops.register_backward_op(st_regularizer_backward)


def st_regularizer(
    mask: Tensor | None,
    w: Tensor | None,
    tv_weight: float = 1e-5,
    contrast_weight: float = 1e-4,
    unimodal_weight: float = 1.0,
    *,
    sqrt: bool = True,
    tv_reduction: str = "sum",
    unimodal_reduction: str = "mean",
    backend: str | None = None,
) -> Tensor:
    """tv_weight·TV(mask) + contrast_weight·contrast(mask) + unimodal_weight·unimodality(w)
    (Meng et al.; see :mod:`attnpool.losses`) in one fused kernel, forward and backward.

    Args:
        mask: spatial masks ``[B, T, H, W]`` (sigmoid outputs) or None (no mask terms).
        w: temporal weights ``[B, T]`` (softmax over T) or None (no unimodality term).
    Returns a 0-dim tensor in the inputs' dtype.
    """
    for name, r in (("tv_reduction", tv_reduction), ("unimodal_reduction", unimodal_reduction)):
        if r not in ("sum", "mean"):
            raise ValueError(f"{name} must be 'sum' or 'mean', got {r!r}")
    if mask is None and w is None:
        raise ValueError("st_regularizer needs mask [B, T, H, W] or w [B, T]")
    if mask is not None:
        _ops.check_float("mask", mask, "[B, T, H, W]")
        if mask.dim() != 4:
            raise ValueError(f"mask must have shape [B, T, H, W], got {list(mask.shape)}")
    if w is not None:
        _ops.check_float("w", w, "[B, T]")
        if w.dim() != 2:
            raise ValueError(f"w must have shape [B, T], got {list(w.shape)}")
    if mask is None:  # neutral stand-ins: their terms are 0 and have weight 0
        mask = w.new_zeros(*w.shape, 1, 1)
        tv_weight = contrast_weight = 0.0
    elif w is None:
        w = mask.new_zeros(mask.shape[:2])
        unimodal_weight = 0.0
    mask, w = _ops.autocast(mask, w)
    _ops.check_like("w", w, mask, tuple(mask.shape[:2]), "mask")
    name = backends.resolve("st_regularizer", backend, mask.device, mask.dtype)
    args = (float(tv_weight), float(contrast_weight), float(unimodal_weight))
    if name == "reference":
        return reference.st_regularizer(mask, w, *args, sqrt=sqrt, tv_reduction=tv_reduction,
                                        unimodal_reduction=unimodal_reduction)
    return _ops.call(st_regularizer_op, mask, w, *args, sqrt, tv_reduction == "mean",
                              unimodal_reduction == "mean", name)


def temporal_attention_pool(x: Tensor, mask: Tensor, scores: Tensor, *,
                            backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Spatio-temporal attention pooling (Meng et al.): w = softmax_T(scores),
    pooled = Σ_t w_t · mean_{i,j}(mask_t ⊙ x_t).

    Args:
        x: clip features ``[B, T, C, H, W]``; mask: spatial masks ``[B, T, H, W]``;
        scores: temporal scores ``[B, T]``.
    Returns ``(pooled [B, C], w [B, T])``. x is read once (the masked means are fused);
    the softmax and the sum over frames work on the small ``[B, T, C]`` means.
    """
    _ops.check_float("x", x, "[B, T, C, H, W]")
    _ops.check_float("scores", scores, "[B, T]")
    x, mask, scores = _ops.autocast(x, mask, scores)
    check_clip(x, mask)
    _ops.check_like("scores", scores, x, tuple(x.shape[:2]))
    f = masked_frame_means(x, mask, backend=backend)
    w = torch.softmax(scores, dim=1)
    return torch.einsum("bt,btc->bc", w, f), w


def total_variation(mask: Tensor, reduction: str = "sum", *, backend: str | None = None) -> Tensor:
    """Anisotropic total variation of the masks ``[B, T, H, W]``, summed over the B·T maps
    (``reduction="mean"``: averaged)."""
    return st_regularizer(mask, None, 1.0, 0.0, 0.0, tv_reduction=reduction,
                                     backend=backend)


def mask_contrast(mask: Tensor, *, backend: str | None = None) -> Tensor:
    """(1/B) Σ ½·M·1{M<0.5} − ½·M·1{M>0.5} over the masks ``[B, T, H, W]``."""
    return st_regularizer(mask, None, 0.0, 1.0, 0.0, backend=backend)


def unimodality(w: Tensor, sqrt: bool = True, reduction: str = "mean", *,
                backend: str | None = None) -> Tensor:
    """Σ_t relu(w[t-1]·w[t+1] − w[t]²) (its square root when ``sqrt``, as the official code)
    over the temporal weights ``[B, T]``, t = 1..T-2; averaged over the B·(T-2) terms by
    default (0 when T < 3)."""
    return st_regularizer(None, w, 0.0, 0.0, 1.0, sqrt=sqrt,
                                     unimodal_reduction=reduction, backend=backend)


class SpatioTemporalRegularizer(_ops.NotScriptable, reference.SpatioTemporalRegularizer):
    """``forward(mask [B, T, H, W], w [B, T])`` -> tv_weight·TV(mask) +
    contrast_weight·contrast(mask) + unimodal_weight·unimodality(w), fused.
    Defaults follow the official code."""

    def __init__(self, tv_weight: float = 1e-5, contrast_weight: float = 1e-4,
                 unimodal_weight: float = 1.0, *, backend: str | None = None, **kwargs) -> None:
        super().__init__(tv_weight, contrast_weight, unimodal_weight, **kwargs)
        self.backend = backend

    def forward(self, mask: Tensor, w: Tensor) -> Tensor:
        return st_regularizer(
            mask, w, self.tv_weight, self.contrast_weight, self.unimodal_weight, sqrt=self.sqrt,
            tv_reduction=self.tv_reduction, unimodal_reduction=self.unimodal_reduction,
            backend=self.backend)


class SpatioTemporalAttention(_ops.NotScriptable, reference.SpatioTemporalAttention):
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
        self.regularizer = SpatioTemporalRegularizer(
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
        return masked_frame_means(x, mask, backend=self.backend)
