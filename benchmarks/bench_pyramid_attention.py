"""Interaction-aware pyramid attention (our formulation of Du et al.): the fused op vs eager
and torch.compile of the reference, output and loss both backpropagated.

    python benchmarks/bench_pyramid_attention.py [--device cpu|cuda] [--shape B,T,C0,H0,C1,H1,...]

Levels are square maps C_s x H_s x H_s; T = 1 means plain maps [B, C, H, W], T > 1 clips.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from attnpool import functional, reference  # noqa: E402

PYRAMID = (256, 56, 512, 28, 1024, 14, 2048, 7)
# (B, T, C0, H0, ...): the GPU shape at B=64; B scaled by 1/16 on the CPU (inputs 24.6 MB
# instead of 394 MB). The sweeps vary the batch and the clip length.
SHAPES = {"cpu": [(4, 1) + PYRAMID], "cuda": [(64, 1) + PYRAMID]}
SWEEP = {"cpu": [(b, 1) + PYRAMID for b in (1, 2, 8, 16)] + [(1, t) + PYRAMID for t in (4, 8)],
         "cuda": [(1, 8) + PYRAMID, (16, 1) + PYRAMID]}


def cases(B, T, *levels, device, dtype):
    torch.manual_seed(0)
    sizes = list(zip(levels[0::2], levels[1::2]))
    lead = (B,) if T == 1 else (B, T)
    maps = tuple(torch.randn(*lead, C, H, H, device=device, dtype=dtype) for C, H in sizes)
    weights = tuple(torch.randn(C, device=device, dtype=dtype) / C**0.5 for C, _ in sizes)
    bias = torch.zeros(len(sizes), device=device, dtype=dtype)
    S = len(sizes)
    grads = (torch.randn(B, sum(C for C, _ in sizes), device=device, dtype=dtype),
             torch.ones((), device=device, dtype=dtype))
    shape = f"B={B},T={T}," + ",".join(f"{C}@{H}" for C, H in sizes)

    def call(fn):
        return lambda *t: fn(list(t[:S]), list(t[S:2 * S]), t[2 * S])

    inputs = maps + weights + (bias,)
    yield harness.Case("pyramid_attention", "eager", shape,
                       harness.call_setup(lambda: call(reference.pyramid_attention), inputs, grads))
    yield harness.Case("pyramid_attention", "compile", shape,
                       harness.call_setup(lambda: call(harness.compiled(reference.pyramid_attention)),
                                          inputs, grads))
    for backend in harness.kernel_backends("pyramid_attention", device, dtype):
        fused = functools.partial(functional.pyramid_attention, backend=backend)
        yield harness.Case("pyramid_attention", f"attnpool-{backend}", shape,
                           harness.call_setup(lambda fused=fused: call(fused), inputs, grads))


if __name__ == "__main__":
    # the harness passes (*shape, device, dtype); levels vary in number
    harness.cli(__doc__, SHAPES, SWEEP, lambda *a: cases(*a[:-2], device=a[-2], dtype=a[-1]))
