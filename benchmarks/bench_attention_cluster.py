"""Attention clusters: eager reference vs torch.compile vs attnpool backends.

    python benchmarks/bench_attention_cluster.py [--device cpu|cuda] [--sweep] [--dtype float32]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import attnpool  # noqa: E402
from attnpool import reference  # noqa: E402

OP = "attention_cluster"
# (B, L, F, N): on the CPU a 2-core-sized shape and the GPU shape's F and N at B=32; the
# sweeps vary L (frames) and N (units) alone, on the CPU around B=8, F=1024, L=25, N=32.
SHAPES = {"cpu": [(32, 25, 1024, 32), (32, 25, 2048, 64)], "cuda": [(128, 25, 2048, 64)]}
SWEEP = {"cpu": [(8, ell, 1024, 32) for ell in (8, 25, 100, 300)] +
                [(8, 25, 1024, n) for n in (8, 128, 256)],
         "cuda": [(128, 25, 2048, n) for n in (8, 32, 128, 256)] +
                 [(128, ell, 2048, 64) for ell in (8, 100, 300)]}


def cases(B, L, F, N, device, dtype):
    shape = f"B={B},L={L},F={F},N={N}"
    torch.manual_seed(0)
    ref = reference.AttentionCluster(F, N).to(device, dtype)
    x0 = torch.randn(B, L, F, device=device, dtype=dtype)
    grad = torch.randn(B, N * F, device=device, dtype=dtype)

    yield harness.Case(OP, "eager", shape, harness.call_setup(lambda: ref, x0, grad))
    yield harness.Case(OP, "compile", shape,
                       harness.call_setup(lambda: harness.compiled(ref), x0, grad))
    for backend in harness.kernel_backends(OP, device, dtype):
        def fused(backend=backend):
            m = attnpool.AttentionCluster(F, N, backend=backend).to(device, dtype)
            m.load_state_dict(ref.state_dict())
            return m
        yield harness.Case(OP, f"attnpool-{backend}", shape,
                           harness.call_setup(fused, x0, grad))


if __name__ == "__main__":
    harness.cli(__doc__, SHAPES, SWEEP, cases)
