"""Regularisers of spatio-temporal attention (Meng et al., "Where and When to Look?"), defined
in :mod:`attnpool.st_regularizer`.

Every term runs in the fused ``st_regularizer`` kernel (one launch for the forward, one for
the backward); the single-term functions call it with the other weights at zero.
"""

from __future__ import annotations

from attnpool.st_regularizer import (
    SpatioTemporalRegularizer,
    mask_contrast,
    total_variation,
    unimodality,
)

__all__ = ["SpatioTemporalRegularizer", "mask_contrast", "total_variation", "unimodality"]
