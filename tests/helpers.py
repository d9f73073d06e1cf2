"""Shared test utilities: which backends run here, and the tolerance rules (docs/design.md,
"Tests and tolerances")."""

from __future__ import annotations

import copy

import torch

from attnpool import backends

KERNEL_BACKENDS = ("cpp", "triton", "cuda")


def backends_for(op: str, device: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Kernel backends that can serve ``op`` on this machine for this device and dtype."""
    dev = torch.device(device)
    return [b for b in KERNEL_BACKENDS if backends.why_not(op, b, dev, dtype) is None]


def rounded_to(value, dtype: torch.dtype):
    """``value`` (a tensor, module, or tuple / list of them) with every floating-point tensor
    rounded to ``dtype`` and back: the inputs a kernel at that dtype really sees. Low
    precision is judged against float64 on these, since the rounding of the inputs alone can
    move an ill-conditioned result (a relu at a near tie, a softmax of large scores) far more
    than any kernel's arithmetic, and a reference at that dtype may land closer by luck."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype).to(value.dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(rounded_to(v, dtype) for v in value)
    if isinstance(value, torch.nn.Module):
        value = copy.deepcopy(value)
        with torch.no_grad():
            for p in value.parameters():
                p.copy_(rounded_to(p, dtype))
        return value
    return value


def max_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - ref.double()).abs().max().item()


def assert_close(actual: torch.Tensor, ref64: torch.Tensor, name: str,
                 ref_lowp: torch.Tensor | None = None, scale_floor: float = 0.0) -> None:
    """fp32 / fp64: ‖actual − ref‖∞ ≤ tol·max(‖ref‖∞, scale_floor) against the float64
    reference. fp16 / bf16: the error is at most twice the reference's own error at that dtype.
    scale_floor: the magnitude of the quantities ref is computed from, for a ref that is 0 (or
    tiny) in exact arithmetic, where any rounding residue would count as infinitely wrong."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    # NaN / Inf must sit where the reference has them.
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite pattern differs"
    assert torch.equal(torch.isnan(actual), torch.isnan(ref64)), f"{name}: NaN pattern differs"
    actual, ref64 = actual[finite], ref64[finite]
    if actual.numel() == 0:
        return
    scale = max(ref64.abs().max().item(), scale_floor, 1e-30)
    err = max_err(actual, ref64)
    if actual.dtype in (torch.float16, torch.bfloat16):
        assert ref_lowp is not None, f"{name}: low precision needs the reference at that dtype"
        bound = 2 * max_err(ref_lowp[finite], ref64) + 1e-6 * scale
    elif actual.dtype == torch.float32:
        bound = 1e-5 * scale
        if ref_lowp is not None:
            bound = max(bound, 2 * max_err(ref_lowp[finite], ref64))
    else:
        bound = 1e-11 * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})"


class torch_ops:
    """``torch.ops.attnpool`` as a backend's kernels register each op: the compiled ones as
    ``attnpool::<name>`` (C++), the Triton ones as ``attnpool::<name>_triton``."""

    def __init__(self, backend: str):
        self.suffix = "_triton" if backend == "triton" else ""

    def __getattr__(self, name: str):
        return getattr(torch.ops.attnpool, name + self.suffix)


def assert_same_with_threads(run, counts=(1, 2, 3)) -> None:
    """run() -> dict of tensors: bitwise the same with each intra-op thread count."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for n, got in zip(counts[1:], results[1:]):
        for name, want in results[0].items():
            assert torch.equal(got[name], want), f"{name}: {n} threads differ from {counts[0]}"
