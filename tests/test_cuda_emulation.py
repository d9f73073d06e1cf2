"""The CUDA kernels of csrc/cuda run on the CPU through the emulation of tests/cuda_emulation
(cuda_emu.h + transform.py, see its README), checked against the plain-PyTorch reference
(attnpool.reference, float64, autograd for the gradients) before any GPU is available.

The launchers are called as the torch glue calls them (same buffers, same sums of the
per-sample partials), at small odd shapes that reach several blocks, partial warps, the
multi-tile / multi-block / chunked paths and the global-memory fallbacks.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from attnpool import reference as ref

pytestmark = pytest.mark.cuda_emulation

_BUILD = Path(__file__).resolve().parent / "cuda_emulation" / "build.py"
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# ‖got − ref‖∞ ≤ tol·‖ref‖∞ against the float64 reference of the same (rounded) inputs.
_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _load_build_module():
    spec = importlib.util.spec_from_file_location("cuda_emu_build", _BUILD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The emulated library, built once per session. A build failure fails (not skips) every
    test with the compiler's output."""
    build = _load_build_module()
    out = tmp_path_factory.mktemp("cuda_emu_build")
    # CUDA_EMU_SRC_DIR: another copy of csrc/cuda (e.g. a deliberately broken one, to check
    # that these tests catch the bug)
    src = Path(os.environ.get("CUDA_EMU_SRC_DIR", build.CUDA_SRC))
    try:
        lib_path = build.build(out, src_dir=src)
    except build.BuildError as e:
        pytest.fail(str(e), pytrace=False)
    return build.load(lib_path)


# ------------------------------------------------------------------ helpers
def _p(t: torch.Tensor | None):
    if t is None:
        return None
    assert t.is_contiguous() or t.numel() == 0
    return ctypes.c_void_p(t.data_ptr())


def _check(lib, rc: int, what: str) -> None:
    if rc != 0:
        msg = lib.cuda_emu_last_message().decode()
        lib.cuda_emu_clear_message()
        pytest.fail(f"{what}: cudaError {rc}: {msg}", pytrace=False)


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _workspace(elems: int, dtype) -> torch.Tensor | None:
    return torch.full((elems,), float("nan"), dtype=_opmath(dtype)) if elems > 0 else None


def _empty(shape, dtype):
    """Output buffers start as NaN: an element the kernels do not write shows."""
    return torch.full(shape, float("nan"), dtype=dtype)


def _close(got: torch.Tensor, want: torch.Tensor, name: str, dtype, scale_floor: float = 0.0):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern differs"
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), f"{name}: non-finite pattern differs"
    if not fin.any():
        return
    g, w = got[fin], want[fin]
    scale = max(w.abs().max().item(), scale_floor, 1e-300)
    err = (g - w).abs().max().item()
    bound = _TOL[dtype] * scale
    assert err <= bound, f"{name} ({dtype}): max error {err:.3e} > {bound:.3e} (scale {scale:.3e})"


def _rand(gen, shape, dtype, lo=-1.0, hi=1.0):
    """Random values rounded to dtype, returned in dtype and as the float64 of those."""
    t = (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    return t.contiguous(), t.double()


# ------------------------------------------------------------------ attention cluster
def _cluster_emu(lib, x, scores, lengths, alpha, beta, grad_out, shift, eps,
                 eps_placement="clamp"):
    # the kernels' norm max(sqrt(‖u‖² + eps_sqrt), eps), as the torch glue is called
    eps, eps_sqrt = (eps, 0.0) if eps_placement == "clamp" else (0.0, eps)
    dtype = x.dtype
    B, L, F = x.shape
    N = scores.shape[2]
    code = _DTYPE_CODE[dtype]
    om = _opmath(dtype)
    out = _empty((B, N * F), dtype)
    attn = _empty((B, N, L), om)
    norm = _empty((B, N), om)
    scores = scores.to(om).contiguous()  # the kernels take the scores in opmath
    _check(lib, lib.emu_cluster_forward(code, _p(x), _p(scores), _p(lengths), _p(alpha), _p(beta),
                                        _p(out), _p(attn), _p(norm), B, L, F, N, int(shift), eps,
                                        eps_sqrt),
           "cluster_pool_forward")
    grad_x = _empty((B, L, F), dtype)
    grad_scores = _empty((B, L, N), dtype)
    ga = _empty((B, N), om)
    gb = _empty((B, N), om)
    coef = _empty((B, N, 3), torch.float64)
    ws = _workspace(lib.emu_cluster_backward_workspace_elems(code, B, L, N), dtype)
    _check(lib, lib.emu_cluster_backward(code, _p(grad_out), _p(x), _p(lengths), _p(attn), _p(norm),
                                         _p(alpha), _p(beta), _p(grad_x), _p(grad_scores), _p(ga),
                                         _p(gb), _p(coef), _p(ws), B, L, F, N, int(shift), eps,
                                         eps_sqrt),
           "cluster_pool_backward")
    return {"out": out, "attn": attn, "norm": norm, "grad_x": grad_x, "grad_scores": grad_scores,
            "grad_alpha": ga.sum(0), "grad_beta": gb.sum(0)}


def _cluster_ref(x, scores, lengths, alpha, beta, grad_out, shift, eps, eps_placement="clamp"):
    x, scores, alpha, beta = (t.detach().double().requires_grad_() for t in (x, scores, alpha, beta))
    out, a = ref.cluster_pool(x, scores, lengths, alpha, beta, shift, eps, eps_placement)
    with torch.no_grad():  # the kernel's norm: sqrt(||alpha v + beta||² + eps_sqrt) (||v|| without shift)
        v = torch.bmm(a, x.masked_fill(~ref.valid_frames(lengths, x.shape[1])[:, :, None], 0)
                      if lengths is not None else x)
        u = alpha[:, None] * v + beta[:, None] if shift else v
        eps_sqrt = eps if shift and eps_placement == "sqrt" else 0.0
        norm = torch.sqrt((u * u).sum(-1) + eps_sqrt)
    gx, gs, ga, gb = torch.autograd.grad(out, (x, scores, alpha, beta), grad_out.double(),
                                         allow_unused=True)
    zeros = torch.zeros_like(alpha)
    return {"out": out.detach(), "attn": a.detach(), "norm": norm, "grad_x": gx, "grad_scores": gs,
            "grad_alpha": ga if ga is not None else zeros, "grad_beta": gb if gb is not None else zeros}


def _cluster_inputs(B, L, F, N, dtype, seed, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    x, _ = _rand(gen, (B, L, F), dtype)
    scores, _ = _rand(gen, (B, L, N), dtype, -2.0, 2.0)
    alpha, _ = _rand(gen, (N,), dtype, 0.5, 1.5)
    beta, _ = _rand(gen, (N,), dtype, -0.5, 0.5)
    grad_out, _ = _rand(gen, (B, N * F), dtype)
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    return x, scores, lens, alpha, beta, grad_out


_CLUSTER_CASES = [
    # B, L, F, N, lengths: several units (blocks), F over the 256-thread block and the dv chunk
    # (partial second chunk), L over several 16-frame grad_x chunks, tiny F (partial warp).
    pytest.param(2, 37, 300, 3, None, id="B2-L37-F300-N3"),
    pytest.param(3, 21, 5, 2, [21, 9, 1], id="B3-L21-F5-N2-lengths"),
    pytest.param(2, 40, 33, 4, [17, 40], id="B2-L40-F33-N4-lengths"),
    pytest.param(1, 1, 1, 1, None, id="B1-L1-F1-N1"),
]


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,L,F,N,lengths", _CLUSTER_CASES)
def test_attention_cluster(emu, B, L, F, N, lengths, dtype, shift):
    inputs = _cluster_inputs(B, L, F, N, dtype, seed=B * 1000 + L * 10 + F, lengths=lengths)
    got = _cluster_emu(emu, *inputs, shift, 1e-12)
    want = _cluster_ref(*inputs, shift, 1e-12)
    for k in want:
        _close(got[k], want[k], k, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,L,F,N,lengths", _CLUSTER_CASES)
def test_attention_cluster_eps_sqrt(emu, B, L, F, N, lengths, dtype):
    """PaddlePaddle's eps placement, sqrt(‖u‖² + eps): with a unit whose shifted vector is 0
    (alpha = beta = 0), where the clamp form would give gradients eps/sqrt(eps) times larger."""
    inputs = _cluster_inputs(B, L, F, N, dtype, seed=B * 1000 + L * 10 + F + 1, lengths=lengths)
    inputs[3][0] = inputs[4][0] = 0  # alpha, beta of unit 0
    for eps in (1e-12, 1e-3):
        got = _cluster_emu(emu, *inputs, True, eps, "sqrt")
        want = _cluster_ref(*inputs, True, eps, "sqrt")
        for k in want:
            _close(got[k], want[k], f"{k} (eps={eps})", dtype)


def test_attention_cluster_f16(emu):
    inputs = _cluster_inputs(2, 19, 70, 3, torch.float16, seed=7, lengths=[19, 11])
    got = _cluster_emu(emu, *inputs, True, 1e-12)
    want = _cluster_ref(*inputs, True, 1e-12)
    for k in want:
        _close(got[k], want[k], k, torch.float16)


def test_attention_cluster_global_fallback(emu):
    """L past the backward's shared-memory staging (float64: > 2432 frames): the per-unit
    buffers live in the workspace."""
    B, L, F, N = 1, 2500, 3, 2
    assert emu.emu_cluster_backward_workspace_elems(1, B, L, N) > 0
    inputs = _cluster_inputs(B, L, F, N, torch.float64, seed=11, lengths=[2450])
    got = _cluster_emu(emu, *inputs, True, 1e-12)
    want = _cluster_ref(*inputs, True, 1e-12)
    for k in want:
        _close(got[k], want[k], k, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_attention_cluster_nan_padding(emu, dtype):
    """Padded frames are never read: NaN there gives bit for bit the outputs and gradients of
    zeros there, and the gradient of the padded frames is exactly 0."""
    B, L, F, N = 3, 23, 40, 3
    lengths = [23, 10, 4]
    x, scores, lens, alpha, beta, grad_out = _cluster_inputs(B, L, F, N, dtype, seed=5,
                                                             lengths=lengths)
    pad = ~ref.valid_frames(lens, L)  # [B, L]
    x0 = x.masked_fill(pad[:, :, None], 0)
    s0 = scores.masked_fill(pad[:, :, None], 0)
    xn = x.masked_fill(pad[:, :, None], float("nan"))
    sn = scores.masked_fill(pad[:, :, None], float("nan"))
    got0 = _cluster_emu(emu, x0, s0, lens, alpha, beta, grad_out, True, 1e-12)
    gotn = _cluster_emu(emu, xn, sn, lens, alpha, beta, grad_out, True, 1e-12)
    for k in got0:
        assert torch.equal(gotn[k], got0[k]), f"{k}: NaN in padded frames changed it"
    assert torch.all(gotn["grad_x"][pad] == 0), "grad_x of padded frames must be 0"
    assert torch.all(gotn["grad_scores"][pad] == 0), "grad_scores of padded frames must be 0"
    assert torch.all(gotn["attn"].transpose(1, 2)[pad] == 0), "attention of padded frames must be 0"
    want = _cluster_ref(xn, sn, lens, alpha, beta, grad_out, True, 1e-12)
    for k in want:
        _close(gotn[k], want[k], k, dtype)


# ------------------------------------------------------------------ attentional pool
def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x [B, C, n] -> the buffer the kernels read: n-contiguous, or [B, n, C] contiguous."""
    return x.transpose(1, 2).contiguous() if channels_last else x.contiguous()


def _attpool_emu(lib, x, wb, bb, grad_z, grad_h, channels_last):
    dtype = x.dtype
    B, C, n = x.shape
    P = wb.shape[0]
    code = _DTYPE_CODE[dtype]
    om = _opmath(dtype)
    xb = _layout(x, channels_last)
    z = _empty((B, P, C), dtype)
    h = _empty((B, P, n), dtype)
    ws = _workspace(lib.emu_attpool_forward_workspace_elems(code, B, C, n, P), dtype)
    _check(lib, lib.emu_attpool_forward(code, _p(xb), int(channels_last), _p(wb), _p(bb), _p(z), _p(h),
                                        _p(ws), B, C, n, P), "attpool_forward")
    tiles = lib.emu_attpool_num_tiles(n)
    gxb = _empty(tuple(xb.shape), dtype)
    wb_part = _empty((B * tiles, P, C), om)
    bb_part = _empty((B * tiles, P), om)
    gh = grad_h.to(om).contiguous()
    ws = _workspace(lib.emu_attpool_backward_workspace_elems(code, B, C, n, P), dtype)
    _check(lib, lib.emu_attpool_backward(code, _p(grad_z), _p(gh), _p(xb), int(channels_last), _p(h),
                                         _p(wb), _p(gxb), _p(wb_part), _p(bb_part), _p(ws),
                                         B, C, n, P), "attpool_backward")
    gx = gxb.transpose(1, 2) if channels_last else gxb
    return {"z": z, "h": h, "grad_x": gx, "grad_wb": wb_part.sum(0), "grad_bb": bb_part.sum(0)}


def _attpool_ref(x, wb, bb, grad_z, grad_h):
    x, wb, bb = (t.detach().double().requires_grad_() for t in (x, wb, bb))
    z, h = ref.attentional_pool(x, wb, bb)
    gx, gw, gb = torch.autograd.grad((z, h), (x, wb, bb), (grad_z.double(), grad_h.double()))
    return {"z": z.detach(), "h": h.detach(), "grad_x": gx, "grad_wb": gw, "grad_bb": gb}


def _wpool_emu(lib, x, h, grad_z, channels_last):
    dtype = x.dtype
    B, C, n = x.shape
    P = h.shape[1]
    code = _DTYPE_CODE[dtype]
    xb = _layout(x, channels_last)
    z = _empty((B, P, C), dtype)
    ws = _workspace(lib.emu_wpool_forward_workspace_elems(code, B, C, n, P), dtype)
    _check(lib, lib.emu_wpool_forward(code, _p(xb), int(channels_last), _p(h), _p(z), _p(ws),
                                      B, C, n, P), "wpool_forward")
    gxb = _empty(tuple(xb.shape), dtype)
    gh = _empty((B, P, n), dtype)
    ws = _workspace(lib.emu_wpool_backward_workspace_elems(code, B, C, n, P), dtype)
    _check(lib, lib.emu_wpool_backward(code, _p(grad_z), _p(xb), int(channels_last), _p(h), _p(gxb),
                                       _p(gh), _p(ws), B, C, n, P), "wpool_backward")
    return {"z": z, "grad_x": gxb.transpose(1, 2) if channels_last else gxb, "grad_h": gh}


def _wpool_ref(x, h, grad_z):
    x, h = (t.detach().double().requires_grad_() for t in (x, h))
    z = ref.weighted_pool(x, h)
    gx, gh = torch.autograd.grad(z, (x, h), grad_z.double())
    return {"z": z.detach(), "grad_x": gx, "grad_h": gh}


def _attpool_inputs(B, C, n, P, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, _ = _rand(gen, (B, C, n), dtype)
    wb, _ = _rand(gen, (P, C), dtype)
    bb, _ = _rand(gen, (P,), dtype)
    grad_z, _ = _rand(gen, (B, P, C), dtype)
    grad_h, _ = _rand(gen, (B, P, n), dtype)
    hmap, _ = _rand(gen, (B, P, n), dtype)
    return x, wb, bb, grad_z, grad_h, hmap


_ATTPOOL_CASES = [
    # B, C, n, P: n over one 32-position tile (balanced tiles, z partials + finish_z), C past
    # the 8-row unroll and in partial 32-channel groups / past the 256-thread block (CL), every
    # ranks-per-pass (P = 1, 2, 5: KP = 1, 2, 4 with a partial chunk).
    pytest.param(2, 70, 45, 5, id="B2-C70-n45-P5"),
    pytest.param(3, 9, 7, 1, id="B3-C9-n7-P1"),
    pytest.param(1, 300, 33, 2, id="B1-C300-n33-P2"),
    pytest.param(2, 33, 96, 3, id="B2-C33-n96-P3"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nc", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,C,n,P", _ATTPOOL_CASES)
def test_attentional_pool(emu, B, C, n, P, dtype, channels_last):
    x, wb, bb, grad_z, grad_h, hmap = _attpool_inputs(B, C, n, P, dtype, seed=B + C + n + P)
    got = _attpool_emu(emu, x, wb, bb, grad_z, grad_h, channels_last)
    want = _attpool_ref(x, wb, bb, grad_z, grad_h)
    for k in want:
        _close(got[k], want[k], k, dtype)
    got = _wpool_emu(emu, x, hmap, grad_z, channels_last)
    want = _wpool_ref(x, hmap, grad_z)
    for k in want:
        _close(got[k], want[k], "weighted_pool " + k, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nc", "cl"])
def test_attentional_pool_f16(emu, channels_last):
    x, wb, bb, grad_z, grad_h, hmap = _attpool_inputs(2, 40, 37, 3, torch.float16, seed=3)
    got = _attpool_emu(emu, x, wb, bb, grad_z, grad_h, channels_last)
    # (the backward reads h as the forward stored it, rounded to float16: within the bound)
    want = _attpool_ref(x, wb, bb, grad_z, grad_h)
    for k in ("z", "h", "grad_wb", "grad_bb", "grad_x"):
        _close(got[k], want[k], k, torch.float16)
    got = _wpool_emu(emu, x, hmap, grad_z, channels_last)
    want = _wpool_ref(x, hmap, grad_z)
    for k in want:
        _close(got[k], want[k], "weighted_pool " + k, torch.float16)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nc", "cl"])
def test_attentional_pool_global_fallback(emu, channels_last):
    """P past the shared-memory tiles (float64: P > 128 forward, > 64 backward): h / dh tiles
    in the workspace."""
    B, C, n, P = 1, 40, 37, 130
    assert emu.emu_attpool_backward_workspace_elems(1, B, C, n, P) > 0
    assert emu.emu_wpool_backward_workspace_elems(1, B, C, n, P) > 0
    x, wb, bb, grad_z, grad_h, hmap = _attpool_inputs(B, C, n, P, torch.float64, seed=9)
    got = _attpool_emu(emu, x, wb, bb, grad_z, grad_h, channels_last)
    want = _attpool_ref(x, wb, bb, grad_z, grad_h)
    for k in want:
        _close(got[k], want[k], k, torch.float64)
    got = _wpool_emu(emu, x, hmap, grad_z, channels_last)
    want = _wpool_ref(x, hmap, grad_z)
    for k in want:
        _close(got[k], want[k], "weighted_pool " + k, torch.float64)


# ------------------------------------------------------------------ st regulariser
def _st_emu(lib, mask, w, grad_total, params):
    dtype = mask.dtype
    B, T, H, W = mask.shape
    code = _DTYPE_CODE[dtype]
    args = (params["tv_weight"], params["contrast_weight"], params["unimodal_weight"],
            int(params["sqrt"]), int(params["tv_mean"]), int(params["unimodal_mean"]))
    total = _empty((), dtype)
    ws = _workspace(lib.emu_st_forward_workspace_elems(code, B, T, H, W), dtype)
    _check(lib, lib.emu_st_forward(code, _p(mask), _p(w), _p(total), _p(ws), B, T, H, W, *args),
           "st_forward")
    gm = _empty((B, T, H, W), dtype)
    gw = _empty((B, T), dtype)
    gt = torch.tensor(grad_total, dtype=dtype)
    _check(lib, lib.emu_st_backward(code, _p(gt), _p(mask), _p(w), _p(gm), _p(gw), B, T, H, W, *args),
           "st_backward")
    return {"total": total, "grad_mask": gm, "grad_w": gw}


def _st_ref(mask, w, grad_total, params):
    mask, w = (t.detach().double().requires_grad_() for t in (mask, w))
    total = ref.st_regularizer(
        mask, w, params["tv_weight"], params["contrast_weight"], params["unimodal_weight"],
        sqrt=params["sqrt"], tv_reduction="mean" if params["tv_mean"] else "sum",
        unimodal_reduction="mean" if params["unimodal_mean"] else "sum")
    gm, gw = torch.autograd.grad(total, (mask, w), torch.tensor(grad_total, dtype=torch.float64))
    return {"total": total.detach(), "grad_mask": gm, "grad_w": gw}


def _st_params(tv=0.3, con=0.7, uni=1.3, sqrt=True, tv_mean=False, uni_mean=True):
    return {"tv_weight": tv, "contrast_weight": con, "unimodal_weight": uni, "sqrt": sqrt,
            "tv_mean": tv_mean, "unimodal_mean": uni_mean}


_ST_CASES = [
    # B, T, H, W: one block (benchmark-like, partial last warp), several blocks (> 32768
    # elements: per-block partials + the finishing kernel), T < 3 (no unimodality term).
    pytest.param(3, 7, 5, 9, id="B3-T7-H5-W9"),
    pytest.param(3, 7, 45, 37, id="B3-T7-H45-W37-multiblock"),
    pytest.param(2, 2, 3, 1, id="B2-T2-H3-W1"),
]


@pytest.mark.parametrize("params", [_st_params(), _st_params(1e-5, 1e-4, 1.0, False, True, False)],
                         ids=["sqrt-sum", "nosqrt-mean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,T,H,W", _ST_CASES)
def test_st_regularizer(emu, B, T, H, W, dtype, params):
    gen = torch.Generator().manual_seed(B * T * H * W)
    mask, _ = _rand(gen, (B, T, H, W), dtype, 0.0, 1.0)
    w, _ = _rand(gen, (B, T), dtype, 0.05, 1.0)
    got = _st_emu(emu, mask, w, 1.7, params)
    want = _st_ref(mask, w, 1.7, params)
    for k in want:
        _close(got[k], want[k], k, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16],
                         ids=["f64", "f32", "f16"])
@pytest.mark.parametrize("sqrt", [True, False], ids=["sqrt", "nosqrt"])
def test_st_unimodality_uniform(emu, dtype, sqrt):
    """Uniform temporal weights: every q_t is exactly 0, so the unimodality term and its
    gradient are exactly 0 (relu passes nothing at 0; sqrt's infinite slope never enters)."""
    B, T, H, W = 2, 9, 3, 4
    gen = torch.Generator().manual_seed(1)
    mask, _ = _rand(gen, (B, T, H, W), dtype, 0.0, 1.0)
    w = torch.full((B, T), 1.0 / T, dtype=dtype)
    params = _st_params(0.0, 0.0, 1.0, sqrt)
    got = _st_emu(emu, mask, w, 1.0, params)
    assert got["total"].item() == 0.0
    assert torch.all(got["grad_w"] == 0)
    assert torch.all(got["grad_mask"] == 0)
    want = _st_ref(mask, w, 1.0, params)
    assert want["total"].item() == 0.0 and torch.all(want["grad_w"] == 0)


def test_st_regularizer_f16(emu):
    gen = torch.Generator().manual_seed(2)
    mask, _ = _rand(gen, (2, 6, 7, 5), torch.float16, 0.0, 1.0)
    w, _ = _rand(gen, (2, 6), torch.float16, 0.05, 1.0)
    params = _st_params()
    got = _st_emu(emu, mask, w, 1.0, params)
    want = _st_ref(mask, w, 1.0, params)
    for k in want:
        _close(got[k], want[k], k, torch.float16)


# ------------------------------------------------------------------ pyramid attention
def _pyr_arrays(xs):
    S = len(xs)
    C = (ctypes.c_int64 * S)(*[x.shape[2] for x in xs])
    H = (ctypes.c_int64 * S)(*[x.shape[3] for x in xs])
    W = (ctypes.c_int64 * S)(*[x.shape[4] for x in xs])
    return C, H, W


def _ptrs(ts):
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def _pyramid_emu(lib, xs, weights, bias, grad_out, grad_loss, eps, lam):
    dtype = xs[0].dtype
    code = _DTYPE_CODE[dtype]
    om = _opmath(dtype)
    B, T = xs[0].shape[:2]
    S = len(xs)
    C, H, W = _pyr_arrays(xs)
    Ctot = sum(x.shape[2] for x in xs)
    n = T * xs[-1].shape[3] * xs[-1].shape[4]
    out = _empty((B, Ctot), dtype)
    loss = _empty((), dtype)
    pooled = _empty((B, Ctot, n), om)
    y = _empty((B, S, n), om)
    ws = _workspace(lib.emu_pyramid_forward_workspace_elems(code, B, T, S, C, H, W), dtype)
    _check(lib, lib.emu_pyramid_forward(code, B, T, S, C, H, W, _ptrs(xs), _ptrs(weights), _p(bias),
                                        eps, lam, _p(out), _p(loss), _p(pooled), _p(y), _p(ws)),
           "pyramid_forward")
    gxs = [_empty(tuple(x.shape), dtype) for x in xs]
    gws = [_empty(tuple(w.shape), dtype) for w in weights]
    gbias = _empty((S,), dtype)
    gl = torch.tensor(grad_loss, dtype=dtype)
    ws = _workspace(lib.emu_pyramid_backward_workspace_elems(code, B, T, S, C, H, W), dtype)
    _check(lib, lib.emu_pyramid_backward(code, B, T, S, C, H, W, _p(grad_out), _p(gl), _p(pooled),
                                         _p(y), _ptrs(weights), eps, lam, _ptrs(gxs), _ptrs(gws),
                                         _p(gbias), _p(ws)), "pyramid_backward")
    got = {"out": out, "loss": loss, "pooled": pooled, "y": y, "grad_bias": gbias}
    got.update({f"grad_x{s}": g for s, g in enumerate(gxs)})
    got.update({f"grad_w{s}": g for s, g in enumerate(gws)})
    return got


def _pyramid_ref(xs, weights, bias, grad_out, grad_loss, eps, lam):
    xs = [x.detach().double().requires_grad_() for x in xs]
    weights = [w.detach().double().requires_grad_() for w in weights]
    bias = bias.detach().double().requires_grad_()
    out, loss = ref.pyramid_attention(xs, weights, bias, eps, lam)
    with torch.no_grad():
        pooled = ref.pyramid_pool(xs)
        y = torch.stack([torch.einsum("bcn,c->bn", p, w) + b
                         for p, w, b in zip(pooled, weights, bias)], dim=1)
    grads = torch.autograd.grad((out, loss), (*xs, *weights, bias),
                                (grad_out.double(), torch.tensor(grad_loss, dtype=torch.float64)))
    S = len(xs)
    want = {"out": out.detach(), "loss": loss.detach(), "pooled": torch.cat(pooled, dim=1), "y": y,
            "grad_bias": grads[2 * S]}
    want.update({f"grad_x{s}": grads[s] for s in range(S)})
    want.update({f"grad_w{s}": grads[S + s] for s in range(S)})
    return want


def _pyramid_inputs(B, T, levels, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [_rand(gen, (B, T, c, h, w), dtype)[0] for c, h, w in levels]
    weights = [_rand(gen, (c,), dtype)[0] for c, _, _ in levels]
    bias, _ = _rand(gen, (len(levels),), dtype, -0.3, 0.3)
    grad_out, _ = _rand(gen, (B, sum(c for c, _, _ in levels)), dtype)
    return xs, weights, bias, grad_out


_PYR_CASES = [
    # B, T, levels (C, H, W), last level = common scale: overlapping adaptive windows, several
    # planes per pooling block, unpool thread groups sharing a block; n = 24 (partial warp).
    pytest.param(2, 2, [(5, 9, 11), (40, 6, 5), (3, 3, 4)], id="B2-T2-S3"),
    # n = 5*10*11 = 550 > 512 head threads (several col_dot chunks), frames of > 256 pixels
    # (several unpool tiles).
    pytest.param(1, 5, [(3, 23, 17), (2, 10, 11)], id="B1-T5-S2-n550"),
    # Planes past the float64 pooling tile (4096): row groups (70x70), and rows past it
    # (130x70 onto 2 output rows: the direct, warp-per-cell kernel).
    pytest.param(2, 1, [(2, 70, 70), (1, 130, 70), (3, 2, 3)], id="B2-T1-S3-large-planes"),
    pytest.param(1, 1, [(1, 1, 1)], id="B1-T1-S1-tiny"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,T,levels", _PYR_CASES)
def test_pyramid_attention(emu, B, T, levels, dtype):
    xs, weights, bias, grad_out = _pyramid_inputs(B, T, levels, dtype, seed=B * 100 + T)
    got = _pyramid_emu(emu, xs, weights, bias, grad_out, 0.9, 1e-12, 0.7)
    want = _pyramid_ref(xs, weights, bias, grad_out, 0.9, 1e-12, 0.7)
    for k in want:
        _close(got[k], want[k], k, dtype)


# ------------------------------------------------------------------ emulation checks
def _launches(lib) -> list[str]:
    return lib.cuda_emu_take_log().decode().splitlines()


def _run_all(lib, dtype=torch.float32):
    """One representative case of every op (forward and backward); {name: tensor}."""
    res = {}
    inputs = _cluster_inputs(2, 37, 300, 3, dtype, seed=1, lengths=[37, 12])
    res.update({"cluster " + k: v for k, v in _cluster_emu(lib, *inputs, True, 1e-12).items()})
    x, wb, bb, grad_z, grad_h, hmap = _attpool_inputs(2, 70, 45, 5, dtype, seed=2)
    for cl in (False, True):
        res.update({f"attpool{cl} " + k: v
                    for k, v in _attpool_emu(lib, x, wb, bb, grad_z, grad_h, cl).items()})
        res.update({f"wpool{cl} " + k: v for k, v in _wpool_emu(lib, x, hmap, grad_z, cl).items()})
    gen = torch.Generator().manual_seed(3)
    mask, _ = _rand(gen, (3, 7, 45, 37), dtype, 0.0, 1.0)
    w, _ = _rand(gen, (3, 7), dtype, 0.05, 1.0)
    res.update({"st " + k: v for k, v in _st_emu(lib, mask, w, 1.7, _st_params()).items()})
    for case in _PYR_CASES[:3]:
        B, T, levels = case.values
        xs, weights, bias, grad_out = _pyramid_inputs(B, T, levels, dtype, seed=4)
        res.update({f"pyramid {case.id} " + k: v
                    for k, v in _pyramid_emu(lib, xs, weights, bias, grad_out, 0.9, 1e-12, 0.7).items()})
    return res


def test_schedules_bitwise_identical(emu):
    """The kernels' results may not depend on the order in which the threads of a block run
    between barriers: a race that a missing __syncthreads / shuffle leaves shows as a difference
    between the in-order, reverse and random schedules (every sum has a fixed order, so a
    correct kernel is bitwise deterministic)."""
    try:
        base = _run_all(emu)
        for mode, seed in ((1, 0), (2, 1), (3, 1), (3, 2), (3, 3)):
            emu.cuda_emu_set_schedule(mode, seed)
            other = _run_all(emu)
            for k, v in base.items():
                assert torch.equal(v.nan_to_num(1234.5), other[k].nan_to_num(1234.5)), \
                    f"{k} differs under schedule {mode} (seed {seed}): a race between threads"
    finally:
        emu.cuda_emu_set_schedule(0, 0)


def test_launch_paths(emu):
    """The shapes above reach the paths they are meant to: multi-tile z partials, the
    st finishing kernel, both pooling kernels of large planes, the workspace fallbacks."""
    _launches(emu)
    _run_all(emu, torch.float64)
    log = "\n".join(_launches(emu))
    for kernel in ("cluster_forward_kernel", "cluster_backward_unit_kernel",
                   "cluster_backward_x_kernel", "attpool_forward_kernel<scalar_t, KP, kCL>",
                   "attpool_finish_z_kernel", "attpool_backward_kernel<scalar_t, KP, kCL>",
                   "attpool_forward_kernel<scalar_t, 1, kCL, true>", "wpool_backward_kernel",
                   "st_forward_kernel", "st_finish_kernel", "st_backward_kernel",
                   "pyr_pool_kernel", "pyr_pool_direct_kernel", "pyr_forward_head_kernel",
                   "pyr_loss_mean_kernel", "pyr_backward_head_kernel", "pyr_param_grad_kernel",
                   "pyr_unpool_kernel"):
        assert kernel in log, f"{kernel} never launched:\n{log}"
    assert "st_forward_kernel<scalar_t, index_t> grid(2,1,1)" in log
    # cluster backward_x: 2 feature blocks per sample, 3 chunks of 16 frames
    assert "cluster_backward_x_kernel<scalar_t> grid(4,3,1) block(256,1,1)" in log
    # workspace fallbacks: no dynamic shared memory for the per-unit buffers
    x, wb, bb, grad_z, grad_h, _ = _attpool_inputs(1, 40, 37, 130, torch.float64, seed=9)
    _attpool_emu(emu, x, wb, bb, grad_z, grad_h, False)
    log = _launches(emu)
    assert any(s.startswith("attpool_forward_kernel") and s.endswith("smem 0") for s in log), log
    assert any(s.startswith("attpool_backward_kernel") and s.endswith("smem 0") for s in log), log
    inputs = _cluster_inputs(1, 2500, 3, 2, torch.float64, seed=11)
    _cluster_emu(emu, *inputs, True, 1e-12)
    log = _launches(emu)
    assert any(s.startswith("cluster_backward_unit_kernel") and s.endswith(f"smem {256 * 8}")
               for s in log), log


def test_emulation_reports_failures(emu):
    """A launcher's error comes back as its cudaError_t: invalid sizes give
    cudaErrorInvalidValue (1), a missing workspace too."""
    assert emu.emu_cluster_forward(0, None, None, None, None, None, None, None, None,
                                   0, 1, 1, 1, 1, 1e-12, 0.0) == 1
    x, wb, bb, *_ = _attpool_inputs(1, 4, 45, 2, torch.float32, seed=0)
    z = _empty((1, 2, 4), torch.float32)
    h = _empty((1, 2, 45), torch.float32)
    assert emu.emu_attpool_forward(0, _p(x), 0, _p(wb), _p(bb), _p(z), _p(h), None,
                                   1, 4, 45, 2) == 1
