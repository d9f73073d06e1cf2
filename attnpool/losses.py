"""Regularisers of spatio-temporal attention (Meng et al., "Where and When to Look?").

Every term runs in the fused ``st_regularizer`` kernel (one launch for the forward, one for
the backward); the single-term functions call it with the other weights at zero.
"""

from __future__ import annotations

from torch import Tensor

from attnpool import functional, reference

__all__ = ["SpatioTemporalRegularizer", "mask_contrast", "total_variation", "unimodality"]


def total_variation(mask: Tensor, reduction: str = "sum", *, backend: str | None = None) -> Tensor:
    """Anisotropic total variation of the masks ``[B, T, H, W]``, summed over the B·T maps
    (``reduction="mean"``: averaged)."""
    return functional.st_regularizer(mask, None, 1.0, 0.0, 0.0, tv_reduction=reduction,
                                     backend=backend)


def mask_contrast(mask: Tensor, *, backend: str | None = None) -> Tensor:
    """(1/B) Σ ½·M·1{M<0.5} − ½·M·1{M>0.5} over the masks ``[B, T, H, W]``."""
    return functional.st_regularizer(mask, None, 0.0, 1.0, 0.0, backend=backend)


def unimodality(w: Tensor, sqrt: bool = True, reduction: str = "mean", *,
                backend: str | None = None) -> Tensor:
    """Σ_t relu(w[t-1]·w[t+1] − w[t]²) (its square root when ``sqrt``, as the official code)
    over the temporal weights ``[B, T]``, t = 1..T-2; averaged over the B·(T-2) terms by
    default (0 when T < 3)."""
    return functional.st_regularizer(None, w, 0.0, 0.0, 1.0, sqrt=sqrt,
                                     unimodal_reduction=reduction, backend=backend)


class SpatioTemporalRegularizer(reference.SpatioTemporalRegularizer):
    """``forward(mask [B, T, H, W], w [B, T])`` -> tv_weight·TV(mask) +
    contrast_weight·contrast(mask) + unimodal_weight·unimodality(w), fused.
    Defaults follow the official code."""

    def __init__(self, tv_weight: float = 1e-5, contrast_weight: float = 1e-4,
                 unimodal_weight: float = 1.0, *, backend: str | None = None, **kwargs) -> None:
        super().__init__(tv_weight, contrast_weight, unimodal_weight, **kwargs)
        self.backend = backend

    def forward(self, mask: Tensor, w: Tensor) -> Tensor:
        return functional.st_regularizer(
            mask, w, self.tv_weight, self.contrast_weight, self.unimodal_weight, sqrt=self.sqrt,
            tv_reduction=self.tv_reduction, unimodal_reduction=self.unimodal_reduction,
            backend=self.backend)


