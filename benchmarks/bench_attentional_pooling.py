"""Attentional pooling: eager (paper form) vs torch.compile (factored form) vs attnpool
backends.

    python benchmarks/bench_attentional_pooling.py [--device cpu|cuda] [--shape B,C,H,W,K,P]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import attnpool  # noqa: E402
from attnpool import reference  # noqa: E402

OP = "attentional_pooling"
# (B·T, C, H, W, K, P): a 2-core-sized CPU shape; the GPU shape. The sweeps vary the rank P
# and the map size alone (on the CPU around B=8, C=1024, 14x14).
SHAPES = {"cpu": [(32, 1024, 14, 14, 400, 1)], "cuda": [(256, 2048, 14, 14, 400, 1)]}
SWEEP = {"cpu": [(8, 1024, 14, 14, 400, p) for p in (1, 2, 4, 8)] +
                [(8, 1024, s, s, 400, 1) for s in (7, 28)],
         "cuda": [(256, 2048, 14, 14, 400, p) for p in (2, 4, 8)] + [(256, 2048, 7, 7, 400, 1)]}


class Factored(reference.AttentionalPooling):
    """The best plain-PyTorch form (what torch.compile gets): the factored sums (README,
    "Attentional pooling"), O(n·C·P + C·K·P), no [n, K] top-down maps."""

    def forward(self, x):
        B, C, H, W = x.shape
        z, h = reference.attentional_pool(x.reshape(B, C, H * W), self.weight_bottom_up,
                                          self.bias_bottom_up)
        # per-rank products summed, as attnpool's head (an einsum copies the weight per call)
        return torch.bmm(z.transpose(0, 1), self.weight_top_down.transpose(1, 2)).sum(0) + \
            h.mean(-1) @ self.bias_top_down


def cases(B, C, H, W, K, P, device, dtype):
    shape = f"B={B},C={C},H={H},W={W},K={K},P={P}"
    torch.manual_seed(0)
    ref = reference.AttentionalPooling(C, K, rank=P).to(device, dtype)
    factored = Factored(C, K, rank=P).to(device, dtype)
    factored.load_state_dict(ref.state_dict())
    x0 = torch.randn(B, C, H, W, device=device, dtype=dtype)
    grad = torch.randn(B, K, device=device, dtype=dtype)

    yield harness.Case(OP, "eager", shape, harness.call_setup(lambda: ref, x0, grad))
    yield harness.Case(OP, "compile", shape,
                       harness.call_setup(lambda: harness.compiled(factored), x0, grad))
    for backend in harness.kernel_backends(OP, device, dtype):
        def fused(backend=backend):
            m = attnpool.AttentionalPooling(C, K, rank=P, backend=backend).to(device, dtype)
            m.load_state_dict(ref.state_dict())
            return m
        yield harness.Case(OP, f"attnpool-{backend}", shape,
                           harness.call_setup(fused, x0, grad))


if __name__ == "__main__":
    harness.cli(__doc__, SHAPES, SWEEP, cases)
