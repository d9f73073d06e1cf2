"""Spatio-temporal attention (Meng et al.): the fused regulariser (op st_regularizer) vs eager
and torch.compile of the reference, on mask [B, T, H, W] and w [B, T].

    python benchmarks/bench_st_regularizer.py [--device cpu|cuda] [--shape B,T,C,H,W]

The shapes are the clip shapes of benchmarks/bench_weighted_pool.py (C is unused here), so that
both ops of spatio-temporal attention are measured at the same B, T, H, W.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# the regulariser runs on the masks of the temporal pool's clips (their C is unused here)
from bench_weighted_pool import SHAPES, SWEEP  # noqa: E402

from attnpool import functional, reference  # noqa: E402


def cases(B, T, C, H, W, device, dtype):
    torch.manual_seed(0)
    mask = torch.rand(B, T, H, W, device=device, dtype=dtype)
    w = torch.softmax(torch.randn(B, T, device=device, dtype=dtype), dim=1)
    one = torch.ones((), device=device, dtype=dtype)
    reg_shape = f"B={B},T={T},H={H},W={W}"

    yield harness.Case("st_regularizer", "eager", reg_shape,
                       harness.call_setup(lambda: reference.st_regularizer, (mask, w), one))
    yield harness.Case("st_regularizer", "compile", reg_shape,
                       harness.call_setup(lambda: harness.compiled(reference.st_regularizer),
                                          (mask, w), one))
    for backend in harness.kernel_backends("st_regularizer", device, dtype):
        reg = functools.partial(functional.st_regularizer, backend=backend)
        yield harness.Case("st_regularizer", f"attnpool-{backend}", reg_shape,
                           harness.call_setup(lambda reg=reg: reg, (mask, w), one))


def floors(B, T, C, H, W, device, dtype):
    """The regulariser's memory floor: read mask and w once (and write their gradients)."""
    return harness.stream_floor_ms(torch.rand(B, T, H, W, device=device, dtype=dtype))


if __name__ == "__main__":
    harness.cli(__doc__, SHAPES, SWEEP, cases, floors)
