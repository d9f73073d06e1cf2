"""Time the Triton kernels' tile configurations on a GPU, forward + backward, at the GPU
benchmark shapes: the attention cluster's per-kernel caps (kernels/attention_cluster.py
CONFIGS) and the attentional / weighted pool's block caps, warps and stages
(kernels/attentional_pool.py). Prints one line per configuration as it is measured and the fastest per op
("best ..."); the chosen ones go into the kernels' modules with the figures in
benchmarks/NOTES.md.

    python benchmarks/gpu_tune.py [--op cluster|attentional|wpool]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from attnpool.kernels import attention_cluster as ac  # noqa: E402
from attnpool.kernels import attentional_pool as ap  # noqa: E402

from attnpool import functional, reference  # noqa: E402

DEV = torch.device("cuda")


def _full(fn, inputs, grads):
    """forward + backward of fn(*inputs) into fresh leaves."""
    leaves = [t.clone().requires_grad_() for t in inputs]

    def run():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out[:len(grads)], grads)
    return run


def _line(name: str, ms: float, cfg: str) -> tuple[float, str]:
    """Printed at once: a run cut short by its time limit keeps what it measured."""
    print(f"{name:<12} {ms:8.4f} ms  {cfg}", flush=True)
    return ms, cfg


def _report(name: str, results: list[tuple[float, str]]) -> None:
    if results:
        ms, cfg = min(results)
        print(f"best {name:<12} {ms:8.4f} ms  {cfg}", flush=True)


def tune_cluster(L: int = 25) -> None:
    B, F, N = 128, 2048, 64
    torch.manual_seed(0)
    m = reference.AttentionCluster(F, N).to(DEV)
    x = torch.randn(B, L, F, device=DEV)
    grad = torch.randn(B, N * F, device=DEV)

    def fn(x):
        return functional.attention_cluster(x, m.weight, m.bias, m.alpha, m.beta,
                                            backend="triton")[0]
    base = {k: dict(v) for k, v in ac.CONFIGS.items()}
    results = []
    for kernel in ("fwd", "bwd_scores", "bwd_x"):
        tiles = ((16, 32, 32), (16, 32, 64), (32, 32, 64), (32, 32, 128), (16, 64, 64), (32, 64, 64))
        for (bn, bl, bf), w in itertools.product(tiles, (4, 8)):
            ac.CONFIGS.update({k: dict(v) for k, v in base.items()})
            ac.CONFIGS[kernel]["fp32"] = (bn, bl, bf, w)
            try:
                run = _full(fn, (x,), (grad,))
                ms = harness.time_ms(run, DEV, min_time_s=0.05, rep=10)[0]
            except Exception as e:  # out of resources for this tile, say
                print(f"cluster L={L} {kernel} {(bn, bl, bf, w)}: {type(e).__name__}")
                continue
            results.append(_line("cluster", ms, f"L={L} {kernel} fp32 (BLOCK_N, BLOCK_L, "
                                                    f"BLOCK_F, warps) = {(bn, bl, bf, w)}"))
    ac.CONFIGS.update(base)
    _report("cluster", results)


def _tune_pool(name: str, fn, inputs, grads, block_i=(64,)) -> None:
    saved = (ap.MAX_BLOCK_P, ap.MAX_BLOCK_C, ap.MAX_BLOCK_I, ap.NUM_WARPS, ap.NUM_STAGES)
    results = []
    for bc, bi, w, s in itertools.product((32, 64), block_i, (4, 8), (2, 3)):
        ap.MAX_BLOCK_C, ap.MAX_BLOCK_I, ap.NUM_WARPS, ap.NUM_STAGES = bc, bi, w, s
        try:
            ms = harness.time_ms(_full(fn, inputs, grads), DEV, min_time_s=0.05, rep=10)[0]
        except Exception as e:
            print(f"{name} {(bc, bi, w, s)}: {type(e).__name__}")
            continue
        results.append(_line(name, ms, f"(MAX_BLOCK_C, MAX_BLOCK_I, NUM_WARPS, NUM_STAGES) = "
                                       f"{(bc, bi, w, s)}"))
    ap.MAX_BLOCK_P, ap.MAX_BLOCK_C, ap.MAX_BLOCK_I, ap.NUM_WARPS, ap.NUM_STAGES = saved
    _report(name, results)


def tune_attentional() -> None:
    B, C, H, W, K = 256, 2048, 14, 14, 400
    torch.manual_seed(0)
    m = reference.AttentionalPooling(C, K).to(DEV)
    x = torch.randn(B, C, H, W, device=DEV)

    def fn(x):
        return functional.attentional_pooling(x, m.weight_bottom_up, m.bias_bottom_up,
                                              m.weight_top_down, m.bias_top_down,
                                              backend="triton")[0]
    _tune_pool("attentional", fn, (x,), (torch.randn(B, K, device=DEV),), block_i=(64, 128))


def tune_wpool() -> None:
    B, T, C, H, W = 30, 20, 2048, 7, 7
    torch.manual_seed(0)
    x = torch.randn(B, T, C, H, W, device=DEV)
    mask = torch.rand(B, T, H, W, device=DEV)

    def fn(x, mask):
        return functional.masked_frame_means(x, mask, backend="triton")
    _tune_pool("wpool", fn, (x, mask), (torch.randn(B, T, C, device=DEV),))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--op", action="append", choices=("cluster", "attentional", "wpool"))
    args = p.parse_args()
    for op in args.op or ("cluster", "attentional", "wpool"):
        if op == "cluster":
            tune_cluster()
        elif op == "attentional":
            tune_attentional()
        else:
            tune_wpool()


if __name__ == "__main__":
    main()
