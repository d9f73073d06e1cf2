"""Spatio-temporal attention (Meng et al.): the fused regulariser and the temporal attention
pool vs eager and torch.compile of the reference.

    python benchmarks/bench_spatiotemporal.py [--device cpu|cuda] [--shape B,T,C,H,W]

The regulariser is measured on mask [B, T, H, W] and w [B, T]; the pool on
x [B, T, C, H, W] (the pool's backward also takes a gradient through the weights w).
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from attnpool import functional, reference  # noqa: E402

# (B, T, C, H, W): the GPU shape on both devices (x is 230 MiB, far beyond the CPU's caches, as in
# training), and on the CPU also a 30 MiB x, which fits this machine's 32 MiB L3 on its own.
SHAPES = {"cpu": [(30, 20, 2048, 7, 7), (8, 20, 1024, 7, 7)], "cuda": [(30, 20, 2048, 7, 7)]}
SWEEP = {"cpu": [(8, t, 1024, 7, 7) for t in (8, 40, 80)] + [(8, 20, 1024, 14, 14)],
         "cuda": [(30, 20, 2048, 14, 14), (30, 64, 2048, 7, 7)]}


def cases(B, T, C, H, W, device, dtype):
    torch.manual_seed(0)
    mask = torch.rand(B, T, H, W, device=device, dtype=dtype)
    w = torch.softmax(torch.randn(B, T, device=device, dtype=dtype), dim=1)
    x = torch.randn(B, T, C, H, W, device=device, dtype=dtype)
    scores = torch.randn(B, T, device=device, dtype=dtype)
    one = torch.ones((), device=device, dtype=dtype)
    grads = (torch.randn(B, C, device=device, dtype=dtype), torch.randn(B, T, device=device,
                                                                        dtype=dtype))
    reg_shape, pool_shape = f"B={B},T={T},H={H},W={W}", f"B={B},T={T},C={C},H={H},W={W}"

    yield harness.Case("st_regularizer", "eager", reg_shape,
                       harness.call_setup(lambda: reference.st_regularizer, (mask, w), one))
    yield harness.Case("st_regularizer", "compile", reg_shape,
                       harness.call_setup(lambda: harness.compiled(reference.st_regularizer),
                                          (mask, w), one))
    yield harness.Case("temporal_attention_pool", "eager", pool_shape,
                       harness.call_setup(lambda: reference.temporal_attention_pool,
                                          (x, mask, scores), grads))
    yield harness.Case("temporal_attention_pool", "compile", pool_shape,
                       harness.call_setup(lambda: harness.compiled(reference.temporal_attention_pool),
                                          (x, mask, scores), grads))
    for backend in harness.kernel_backends("st_regularizer", device, dtype):
        reg = functools.partial(functional.st_regularizer, backend=backend)
        yield harness.Case("st_regularizer", f"attnpool-{backend}", reg_shape,
                           harness.call_setup(lambda reg=reg: reg, (mask, w), one))
    for backend in harness.kernel_backends("weighted_pool", device, dtype):
        pool = functools.partial(functional.temporal_attention_pool, backend=backend)
        yield harness.Case("temporal_attention_pool", f"attnpool-{backend}", pool_shape,
                           harness.call_setup(lambda pool=pool: pool, (x, mask, scores), grads))


def floors(B, T, C, H, W, device, dtype):
    """The pool's memory floor: the forward reads x, the backward reads x and writes grad_x."""
    return harness.stream_floor_ms(torch.randn(B, T, C, H, W, device=device, dtype=dtype))


if __name__ == "__main__":
    harness.cli(__doc__, SHAPES, SWEEP, cases, floors)
