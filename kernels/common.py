"""Pieces every Triton kernel module shares: IEEE division and square root and scalar
arguments as opmath values inside kernels, and the host-side choices of dot precision and
block sizes (the accumulation dtype is attnpool._ops.opmath)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnpool._ops import opmath  # noqa: F401  (the accumulation dtype: one home, re-exported)

# input_precision of tl.dot for float32 inputs ("ieee": exact; "tf32" would be faster).
FP32_DOT_PRECISION = "ieee"


@triton.jit
def div_rn(x, y):
    """IEEE division (x / y is approximate for float32 on GPUs)."""
    if x.dtype == tl.float64:
        r = x / y
    else:
        r = tl.math.div_rn(x, y)
    return r


@triton.jit
def sqrt_rn(x):
    """IEEE square root (tl.sqrt is the fast approximate one for float32 on GPUs)."""
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def as_scalar(v, ACC: tl.constexpr):
    """A scalar kernel argument (int, float32, or an int specialised to a constexpr 1) as an
    opmath 0-dim value."""
    return tl.sum(tl.zeros([1], dtype=ACC) + v, axis=0)


def dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


def block(size: int, cap: int) -> int:
    """A power-of-two block >= 16 (tl.dot's minimum) covering ``size``, at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(size)))
