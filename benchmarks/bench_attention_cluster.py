"""Attention clusters: eager reference vs torch.compile vs attnpool backends (DESIGN §5).

    python benchmarks/bench_attention_cluster.py [--device cpu|cuda] [--sweep] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import attnpool  # noqa: E402
from attnpool import reference  # noqa: E402

OP = "attention_cluster"
# (B, L, F, N): the CPU shape, the §5 shape scaled to 2 CPU cores, the §5 shape.
SHAPES = {"cpu": [(32, 25, 1024, 32), (32, 25, 2048, 64)], "cuda": [(128, 25, 2048, 64)]}
SWEEP = [(128, 25, 2048, n) for n in (8, 32, 128, 256)] + \
        [(128, ell, 2048, 64) for ell in (8, 100, 300)]


def cases(B, L, F, N, device, dtype):
    shape = f"B={B},L={L},F={F},N={N}"
    torch.manual_seed(0)
    ref = reference.AttentionCluster(F, N).to(device, dtype)
    x0 = torch.randn(B, L, F, device=device, dtype=dtype)
    grad = torch.randn(B, N * F, device=device, dtype=dtype)

    def provider(make_module):
        def setup():
            module = make_module()
            x = x0.clone().requires_grad_()
            state = {}

            def forward():
                state["out"] = module(x)

            def backward():
                state["out"].backward(grad, retain_graph=True)

            return forward, backward
        return setup

    yield harness.Case(OP, "eager", shape, provider(lambda: ref))
    yield harness.Case(OP, "compile", shape, provider(lambda: torch.compile(ref)))
    for backend in ("cpp", "cuda", "triton"):
        if attnpool.available(OP, torch.device(device), dtype)[backend] is None:
            if device == "cpu" and backend == "triton":
                continue  # the interpreter is a test vehicle, not a provider
            def fused(backend=backend):
                m = attnpool.AttentionCluster(F, N, backend=backend).to(device, dtype)
                m.load_state_dict(ref.state_dict())
                return m
            yield harness.Case(OP, f"attnpool-{backend}", shape, provider(fused))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sweep", action="store_true", help="also the N and L sweeps (GPU)")
    p.add_argument("--shape", help="B,L,F,N instead of the defaults")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch the CSV")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = [tuple(map(int, args.shape.split(",")))] if args.shape else \
        SHAPES[device.type] + (SWEEP if args.sweep else [])
    rows = []
    for s in shapes:
        for case in cases(*s, args.device, dtype):
            new = harness.measure(case, device)
            harness.print_rows(new)
            rows += new
    for line in harness.speedups(rows, "attnpool-cpp" if device.type == "cpu" else
                                 "attnpool-cuda"):
        print(line)
    if not args.no_write:
        print("wrote", harness.write_rows(rows, device))


if __name__ == "__main__":
    main()
