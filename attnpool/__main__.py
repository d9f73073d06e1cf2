"""``python -m attnpool``: the self-check report.

Versions, which backends can run here (and why not), and for every op a parity
check of each available backend against the float64 reference plus a short
timing (forward + backward) against the eager reference on this device.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import attnpool
from attnpool import backends, functional, reference


def _cluster_case(device, dtype, B=4, L=9, F=33, N=5):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the same parameters for every backend's case
    m = reference.AttentionCluster(F, N, dtype=torch.float64)
    x = torch.randn(B, L, F, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    grad = torch.randn(B, N * F, generator=g, dtype=torch.float64)

    def run(backend, dtype=dtype, device=device, m=m, x=x, grad=grad):
        mm = reference.AttentionCluster(F, N).to(device, dtype)
        mm.load_state_dict(m.state_dict())
        xx = x.to(device, dtype).requires_grad_()
        out, _ = functional.attention_cluster(xx, mm.weight, mm.bias, mm.alpha, mm.beta,
                                              lengths.to(device), backend=backend)
        out.backward(grad.to(device, dtype))
        return [out.detach(), xx.grad, mm.weight.grad, mm.alpha.grad, mm.beta.grad]

    return run


def _attpool_case(device, dtype, B=3, C=24, H=5, W=6, K=7, P=2):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = reference.AttentionalPooling(C, K, rank=P, dtype=torch.float64)
    with torch.no_grad():  # the official init (std 0.001) would make every check trivial
        for param in m.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64))
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    grad = torch.randn(B, K, generator=g, dtype=torch.float64)

    def run(backend, dtype=dtype, device=device, m=m, x=x, grad=grad):
        mm = reference.AttentionalPooling(C, K, rank=P).to(device, dtype)
        mm.load_state_dict(m.state_dict())
        xx = x.to(device, dtype).requires_grad_()
        logits, _ = functional.attentional_pooling(
            xx, mm.weight_bottom_up, mm.bias_bottom_up, mm.weight_top_down, mm.bias_top_down,
            backend=backend)
        logits.backward(grad.to(device, dtype))
        return [logits.detach(), xx.grad] + [p.grad for p in mm.parameters()]

    return run


def _temporal_pool_case(device, dtype, B=2, T=5, C=24, H=4, W=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, H, W, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, H, W, generator=g, dtype=torch.float64)
    scores = torch.randn(B, T, generator=g, dtype=torch.float64)
    grad = torch.randn(B, C, generator=g, dtype=torch.float64)

    def run(backend, dtype=dtype, device=device):
        xx, mm, ss = (t.to(device, dtype).requires_grad_() for t in (x, mask, scores))
        pooled, _ = functional.temporal_attention_pool(xx, mm, ss, backend=backend)
        pooled.backward(grad.to(device, dtype))
        return [pooled.detach(), xx.grad, mm.grad, ss.grad]

    return run


def _regularizer_case(device, dtype, B=3, T=8, H=7, W=7):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(B, T, H, W, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(B, T, generator=g, dtype=torch.float64), dim=1)

    def run(backend, dtype=dtype, device=device):
        mm, ww = (t.to(device, dtype).requires_grad_() for t in (mask, w))
        total = functional.st_regularizer(mm, ww, 0.1, 0.2, 1.0, backend=backend)
        total.backward()
        return [total.detach().reshape(1), mm.grad, ww.grad]

    return run


def _pyramid_case(device, dtype, B=2, levels=((6, 12), (8, 6), (5, 3))):
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(B, c, s, s, generator=g, dtype=torch.float64) for c, s in levels]
    weights = [torch.randn(c, generator=g, dtype=torch.float64) / c**0.5 for c, _ in levels]
    bias = torch.randn(len(levels), generator=g, dtype=torch.float64)
    grad = torch.randn(B, sum(c for c, _ in levels), generator=g, dtype=torch.float64)

    def run(backend, dtype=dtype, device=device):
        xs = [t.to(device, dtype).requires_grad_() for t in maps]
        ws = [t.to(device, dtype).requires_grad_() for t in weights]
        bb = bias.to(device, dtype).requires_grad_()
        out, loss = functional.pyramid_attention(xs, ws, bb, backend=backend)
        ((out * grad.to(device, dtype)).sum() + loss).backward()
        return [out.detach(), loss.detach().reshape(1)] + [t.grad for t in xs + ws + [bb]]

    return run


# op name -> (parity case builder, timing shape description, timing-case builder)
CHECKS = {
    "attention_cluster": (_cluster_case, "B=16,L=25,F=512,N=32",
                          lambda d, t: _cluster_case(d, t, 16, 25, 512, 32)),
    "attentional_pooling": (_attpool_case, "B=16,C=512,H=W=14,K=400,P=1",
                            lambda d, t: _attpool_case(d, t, 16, 512, 14, 14, 400, 1)),
    "weighted_pool": (_temporal_pool_case, "temporal_attention_pool B=4,T=20,C=256,H=W=7",
                      lambda d, t: _temporal_pool_case(d, t, 4, 20, 256, 7, 7)),
    "st_regularizer": (_regularizer_case, "B=30,T=20,H=W=7",
                       lambda d, t: _regularizer_case(d, t, 30, 20, 7, 7)),
    "pyramid_attention": (_pyramid_case, "B=2, C=256,512,1024,2048 at 56,28,14,7",
                          lambda d, t: _pyramid_case(
                              d, t, 2, ((256, 56), (512, 28), (1024, 14), (2048, 7)))),
}


def _time(fn, device, reps=10):
    fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _rel_err(got, ref):
    num = max((g.double().cpu() - r.double().cpu()).abs().max().item() for g, r in zip(got, ref))
    den = max(r.abs().max().item() for r in ref)
    return num / max(den, 1e-30)


def _build_line(ext) -> str:
    """What attnpool._C was built with: torch, CPU instruction sets, CUDA and its archs."""
    if ext is None:
        return f"attnpool._C: missing ({backends.extension_error()})"
    built = getattr(ext, "torch_version", "?")
    line = (f"attnpool._C: built against torch {built}; cpp kernels for "
            f"{getattr(ext, 'cpu_isas', '?')}")
    if ext.with_cuda:
        archs = ", ".join(f"sm_{a}" for a in getattr(ext, "cuda_archs", "?").split("_"))
        line += f"; CUDA {getattr(ext, 'cuda_version', '?')} kernels for {archs}"
    else:
        line += "; no CUDA kernels (a CPU-only build)"
    return line


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m attnpool", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)

    ext = backends.extension()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"attnpool {attnpool.__version__}  torch {torch.__version__}  triton {triton_version}  "
          f"python {platform.python_version()}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    interp = os.environ.get("TRITON_INTERPRET", "0")
    print(f"device: {device} ({name}), threads={torch.get_num_threads()}, TRITON_INTERPRET={interp}")
    print(_build_line(ext))

    failures = 0
    for op, (make_case, timing_shape, make_timing) in CHECKS.items():
        print(f"\n== {op}")
        reasons = backends.available(op, device, torch.float32)
        auto = backends.resolve(op, "auto", device, torch.float32)
        for b, why in reasons.items():
            print(f"  {b:<10} {'available' if why is None else 'unavailable: ' + why}"
                  f"{'   <- auto' if b == auto else ''}")
        ref = make_case(torch.device("cpu"), torch.float64)("reference")
        usable = [b for b, why in reasons.items() if why is None and b != "reference"]
        for b in usable:
            for dtype in (torch.float64, torch.float32):
                if backends.why_not(op, b, device, dtype):
                    continue
                tol = 1e-10 if dtype == torch.float64 else 1e-5
                try:
                    err = _rel_err(make_case(device, dtype)(b), ref)
                except Exception as e:  # one broken kernel must not hide the others' checks
                    failures += 1
                    last = (str(e).strip().splitlines() or [""])[-1]
                    print(f"  parity {b:<8} {str(dtype):<14} FAIL: {type(e).__name__}: {last}")
                    continue
                ok = err <= tol
                failures += not ok
                print(f"  parity {b:<8} {str(dtype):<14} rel err {err:.2e}  "
                      f"{'ok' if ok else f'FAIL (> {tol:.0e})'}")
        if args.no_timing:
            continue
        timing = make_timing(device, torch.float32)
        base = _time(lambda timing=timing: timing("reference"), device)
        print(f"  time fwd+bwd at {timing_shape} fp32: eager {base:.2f} ms")
        for b in usable:
            if b == "triton" and device.type == "cpu":
                print("  time: triton on the CPU is Triton's interpreter, a test vehicle: not timed")
                continue
            try:
                t = _time(lambda b=b, timing=timing: timing(b), device)
            except Exception as e:
                failures += 1
                print(f"  time: {b} FAIL: {type(e).__name__}")
                continue
            print(f"  time fwd+bwd at {timing_shape} fp32: {b} {t:.2f} ms ({base / t:.2f}x eager)")
    print(f"\n{'all parity checks passed' if failures == 0 else f'{failures} parity checks FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
