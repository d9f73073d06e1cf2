"""Spatio-temporal attention (Meng et al.): the fused regulariser, the masked frame means /
temporal attention pool (weighted_pool op), and the module, against the float64 reference
(DESIGN §3.3, §4, §6)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backends_for, rounded_to
from hypothesis import given
from hypothesis import strategies as st

import attnpool
from attnpool import functional as AF
from attnpool import losses, reference

POOL_BACKENDS = backends_for("weighted_pool", "cpu", torch.float64)
REG_BACKENDS = backends_for("st_regularizer", "cpu", torch.float64)


def make_mask_w(B, T, H, W, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, H, W, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(B, T, generator=g, dtype=torch.float64) * 2, dim=1)
    return mask.to(dtype), w.to(dtype)


def reg_run(mask, w, backend, dtype, **kw):
    mask = mask.detach().clone().to(dtype).requires_grad_()
    w = w.detach().clone().to(dtype).requires_grad_()
    fn = reference.st_regularizer if backend == "reference" else \
        lambda *a, **k: AF.st_regularizer(*a, **k, backend=backend)
    total = fn(mask, w, 1e-1, 2e-1, 1.0, **kw)
    gm, gw = torch.autograd.grad(total, [mask, w])
    return {"total": total.detach(), "grad_mask": gm, "grad_w": gw}


# ------------------------------------------------------------------ regulariser
@pytest.mark.parametrize("backend", REG_BACKENDS)
@given(B=st.integers(1, 3), T=st.integers(1, 6), H=st.integers(1, 5), W=st.integers(1, 5),
       sqrt=st.booleans(), tv=st.sampled_from(["sum", "mean"]),
       uni=st.sampled_from(["sum", "mean"]), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_regularizer_matches_reference(backend, B, T, H, W, sqrt, tv, uni, dtype, seed):
    mask, w = make_mask_w(B, T, H, W, seed)
    kw = {"sqrt": sqrt, "tv_reduction": tv, "unimodal_reduction": uni}
    ref = reg_run(mask, w, "reference", torch.float64, **kw)
    ref_lowp = reg_run(mask, w, "reference", dtype, **kw)
    got = reg_run(mask, w, backend, dtype, **kw)
    for name in ref:
        assert got[name].dtype == dtype
        assert_close(got[name], ref[name], f"{backend}/{name}", ref_lowp[name])


@pytest.mark.parametrize("backend", REG_BACKENDS)
def test_single_terms_match_reference(backend):
    mask, w = make_mask_w(2, 5, 4, 3, seed=1)
    pairs = [
        (losses.total_variation(mask, backend=backend), reference.total_variation(mask)),
        (losses.total_variation(mask, "mean", backend=backend),
         reference.total_variation(mask, "mean")),
        (losses.mask_contrast(mask, backend=backend), reference.mask_contrast(mask)),
        (losses.unimodality(w, backend=backend), reference.unimodality(w)),
        (losses.unimodality(w, sqrt=False, reduction="sum", backend=backend),
         reference.unimodality(w, sqrt=False, reduction="sum")),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", REG_BACKENDS)
def test_regularizer_kinks(backend):
    """Masks at exactly 0.5 and equal neighbours, unimodality terms exactly 0: the
    gradients follow PyTorch's conventions (sign(0) = 0, relu'(0) = 0)."""
    mask = torch.full((2, 4, 3, 3), 0.5, dtype=torch.float64)
    mask[0, 1, 1, 1] = 0.8
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.4, 0.3]], dtype=torch.float64)
    ref = reg_run(mask, w, "reference", torch.float64)
    got = reg_run(mask, w, backend, torch.float64)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("backend", ["reference"] + REG_BACKENDS)
def test_regularizer_gradcheck(backend):
    mask, w = make_mask_w(2, 5, 3, 4, seed=2)
    mask.requires_grad_()
    w.requires_grad_()
    for sqrt in (True, False):
        assert torch.autograd.gradcheck(
            lambda m, v, sqrt=sqrt: AF.st_regularizer(m, v, 0.3, 0.2, 1.0, sqrt=sqrt,
                                                     backend=backend), (mask, w))


@pytest.mark.parametrize("backend", REG_BACKENDS)
def test_regularizer_opcheck(backend):
    mask, w = make_mask_w(2, 5, 3, 4, seed=3)
    args = (mask.requires_grad_(), w.requires_grad_(), 0.1, 0.2, 1.0, True, False, True, backend)
    torch.library.opcheck(torch.ops.attnpool.st_regularizer.default, args)
    torch.library.opcheck(torch.ops.attnpool.st_regularizer_backward.default,
                          (torch.tensor(1.5, dtype=torch.float64), mask.detach(), w.detach(),
                           *args[2:]))


@pytest.mark.parametrize("backend", REG_BACKENDS)
def test_regularizer_deterministic_and_nan(backend):
    mask, w = make_mask_w(3, 7, 6, 5, seed=4, dtype=torch.float32)
    a = reg_run(mask, w, backend, torch.float32)
    b = reg_run(mask, w, backend, torch.float32)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    mask[1, 2, 3, 4] = float("nan")
    assert torch.isnan(reg_run(mask, w, backend, torch.float32)["total"])


def test_regularizer_module_defaults():
    reg = losses.SpatioTemporalRegularizer()
    assert (reg.tv_weight, reg.contrast_weight, reg.unimodal_weight) == (1e-5, 1e-4, 1.0)
    mask, w = make_mask_w(2, 6, 4, 4, seed=5)
    torch.testing.assert_close(reg(mask, w), reference.st_regularizer(mask, w),
                               rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ pooling
def make_clip(B, T, C, H, W, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, H, W, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    mask, _ = make_mask_w(B, T, H, W, seed + 1)
    scores = torch.randn(B, T, generator=g, dtype=torch.float64)
    grad_pooled = torch.randn(B, C, generator=g, dtype=torch.float64)
    grad_w = torch.randn(B, T, generator=g, dtype=torch.float64)
    return x, mask, scores, grad_pooled, grad_w


def pool_run(case, backend, dtype):
    x, mask, scores, gp, gw = case
    x = x.to(dtype).requires_grad_()  # .to keeps the layout
    mask = mask.to(dtype).requires_grad_()
    scores = scores.to(dtype).requires_grad_()
    fn = reference.temporal_attention_pool if backend == "reference" else \
        lambda *a: AF.temporal_attention_pool(*a, backend=backend)
    pooled, w = fn(x, mask, scores)
    grads = torch.autograd.grad([pooled, w], [x, mask, scores], [gp.to(dtype), gw.to(dtype)])
    return dict(zip(["pooled", "w", "grad_x", "grad_mask", "grad_scores"],
                    [pooled.detach(), w.detach(), *grads]))


@pytest.mark.parametrize("backend", POOL_BACKENDS)
@given(B=st.integers(0, 2), T=st.integers(1, 4), C=st.integers(1, 7), H=st.integers(1, 4),
       W=st.integers(1, 4), channels_last=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**30))
def test_pool_matches_reference(backend, B, T, C, H, W, channels_last, dtype, seed):
    case = make_clip(B, T, C, H, W, seed, channels_last)
    ref = pool_run(case, "reference", torch.float64)
    ref_lowp = pool_run(case, "reference", dtype)
    got = pool_run(case, backend, dtype)
    for name in ref:
        assert got[name].dtype == dtype, name
        assert_close(got[name], ref[name], f"{backend}/{name}", ref_lowp[name])


@pytest.mark.parametrize("backend", [b for b in POOL_BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_low_precision(backend, dtype):
    case = make_clip(2, 3, 40, 7, 7, seed=6)
    ref = pool_run(case, "reference", torch.float64)
    ref_lowp = pool_run(case, "reference", dtype)
    got = pool_run(case, backend, dtype)
    for name in ref:
        assert_close(got[name], ref[name], f"{backend}/{dtype}/{name}", ref_lowp[name])


@pytest.mark.parametrize("backend", ["reference"] + POOL_BACKENDS)
def test_pool_gradcheck(backend):
    x, mask, scores, _, _ = make_clip(2, 3, 4, 2, 3, seed=7, channels_last=True)
    inputs = tuple(t.requires_grad_() for t in (x, mask, scores))
    assert torch.autograd.gradcheck(
        lambda *a: AF.temporal_attention_pool(*a, backend=backend), inputs)


@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_weighted_pool_opcheck(backend):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.rand(3, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.attnpool.weighted_pool.default, (x, h, backend))
    grad_z = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.attnpool.weighted_pool_backward.default,
                          (grad_z, x.detach(), h.detach(), backend))


# ------------------------------------------------------------------ module
def test_module_state_dict_and_outputs_match_reference():
    torch.manual_seed(0)
    fused = attnpool.SpatioTemporalAttention(6, (5, 4)).double().eval()
    ref = reference.SpatioTemporalAttention(6, (5, 4)).double().eval()
    assert fused.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    outs = []
    for m in (fused, ref):
        pooled, mask, w = m(x, return_attention=True)
        loss = pooled.square().sum() + m.regularizer(mask, w)
        outs.append((pooled, mask, w, *torch.autograd.grad(loss, [x, *m.parameters()])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_module_compile_fullgraph():
    torch._dynamo.reset()
    m = attnpool.SpatioTemporalAttention(4, (3, 2)).eval()
    x = torch.randn(2, 3, 4, 3, 3, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    pooled, mask, w = compiled(x, return_attention=True)
    torch.testing.assert_close(pooled, m(x))
    reg = torch.compile(m.regularizer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(reg(mask, w), m.regularizer(mask, w))


def test_autocast_cpu_bf16():
    m = attnpool.SpatioTemporalAttention(4, (3, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled, mask, w = m(torch.randn(2, 3, 4, 3, 3), return_attention=True)
        total = m.regularizer(mask, w)
    assert pooled.dtype == torch.bfloat16 and total.dtype == torch.bfloat16


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", ["reference"] + POOL_BACKENDS)
def test_bad_input(backend):
    x, mask, scores, _, _ = make_clip(2, 3, 4, 2, 3, seed=9)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, C, H, W\]"):
        AF.temporal_attention_pool(x[0], mask, scores, backend=backend)
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 3, 2, 3\]"):
        AF.temporal_attention_pool(x, mask[:, :2], scores, backend=backend)
    with pytest.raises(ValueError, match=r"scores must have shape \[2, 3\]"):
        AF.temporal_attention_pool(x, mask, scores[:, :1], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        AF.temporal_attention_pool(x, mask.float(), scores, backend=backend)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T, H, W\]"):
        losses.total_variation(mask[0], backend=backend)
    with pytest.raises(ValueError, match=r"w must have shape \[2, 3\]"):
        AF.st_regularizer(mask, scores[:, :2], backend=backend)
    with pytest.raises(ValueError, match="tv_reduction must be"):
        losses.total_variation(mask, "max", backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 6, H, W\]"):
        attnpool.SpatioTemporalAttention(6, (3, 2))(x.float())


@pytest.mark.parametrize("backend", ["reference"] + POOL_BACKENDS)
def test_empty_batch(backend):
    x, mask, scores, _, _ = make_clip(0, 3, 4, 2, 3, seed=10)
    x.requires_grad_()
    pooled, w = AF.temporal_attention_pool(x, mask, scores, backend=backend)
    assert pooled.shape == (0, 4) and w.shape == (0, 3)
    pooled.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["reference"] + REG_BACKENDS)
def test_regularizer_empty_batch(backend):
    mask, w = make_mask_w(0, 3, 2, 3, seed=10)
    mask.requires_grad_()
    total = AF.st_regularizer(mask, w, backend=backend)
    assert total.item() == 0.0
    total.backward()
    assert mask.grad.shape == mask.shape


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(backend, dtype):
    if backend not in backends_for("weighted_pool", "cuda", dtype):
        pytest.skip(f"{backend} not available on this GPU build")
    case = tuple(t.cuda() for t in make_clip(4, 20, 256, 7, 7, seed=11))
    ref = pool_run(rounded_to(tuple(t.cpu() for t in case), dtype), "reference", torch.float64)
    ref_lowp = pool_run(case, "reference", dtype)
    got = pool_run(case, backend, dtype)
    for name in ref:
        assert_close(got[name].cpu(), ref[name], f"{backend}/{name}", ref_lowp[name].cpu())
    mask, w = (t.cuda() for t in make_mask_w(30, 20, 7, 7, seed=12))
    reg_ref = reg_run(*rounded_to((mask.cpu(), w.cpu()), dtype), "reference", torch.float64)
    reg_lowp = reg_run(mask, w, "reference", dtype)
    reg_got = reg_run(mask, w, backend, dtype)
    for name in reg_ref:
        assert_close(reg_got[name].cpu(), reg_ref[name], f"{backend}/{name}",
                     reg_lowp[name].cpu())


# ------------------------------------------------------------------ unimodality's cancellation
def _unimodality_run(w, backend, sqrt):
    w = w.detach().clone().requires_grad_()
    fn = reference.unimodality if backend == "reference" else \
        lambda *a, **k: losses.unimodality(*a, **k, backend=backend)
    term = fn(w, sqrt=sqrt)
    return term.detach(), torch.autograd.grad(term, w)[0]


@pytest.mark.parametrize("backend", ["reference"] + REG_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sqrt", [True, False])
def test_unimodality_of_equal_weights_is_exactly_zero(backend, dtype, sqrt):
    """q = w[t-1]·w[t+1] − w[t]² of equal weights is exactly 0 (no FMA may leave the rounding
    error of w[t]²): uniform weights (the softmax of a zero-initialised scorer) and clips of
    repeated frames give a zero term and a zero gradient, for every T in 3..40."""
    for T in range(3, 41):
        uniform = torch.softmax(torch.zeros(2, T, dtype=dtype), 1)
        scores = torch.randn(2, (T + 2) // 3, dtype=torch.float64).repeat_interleave(3, 1)[:, :T]
        for w in (uniform, torch.softmax(scores, 1).to(dtype)):
            term, grad = _unimodality_run(w, backend, sqrt)
            ref, ref_grad = _unimodality_run(w.double(), "reference", sqrt)
            if torch.equal(w, uniform):
                assert term.item() == 0.0 and torch.count_nonzero(grad) == 0, (T, term, grad)
            elif backend != "reference":  # repeated frames: equal triples add exactly nothing
                assert_close(term, ref, f"{backend}/T={T}/term")
                assert_close(grad, ref_grad, f"{backend}/T={T}/grad_w")


@pytest.mark.parametrize("backend", REG_BACKENDS)
@pytest.mark.parametrize("sqrt", [True, False])
def test_unimodality_near_the_threshold_matches_float64(backend, sqrt):
    """Weights of a linear ramp of scores are geometric, so q ≈ 0 up to rounding, where
    sqrt's slope magnifies any error of q: float32 weights give the float64 reference's
    value and gradient (evaluated on the same float32 weights) within the fp32 bound. (The
    reference itself forms q in float32 for float32 weights: it is not held to this.)"""
    for T in range(3, 41):
        for slope in (0.1, 0.7, 2.5):
            w = torch.softmax(slope * torch.arange(T, dtype=torch.float64), 0)[None].float()
            term, grad = _unimodality_run(w, backend, sqrt)
            ref, ref_grad = _unimodality_run(w.double(), "reference", sqrt)
            assert_close(term, ref, f"{backend}/T={T}/slope={slope}/term")
            assert_close(grad, ref_grad, f"{backend}/T={T}/slope={slope}/grad_w")


# ------------------------------------------------------------------ module details
def test_mask_network_matches_the_official_layers():
    """Three 3×3 convolutions without bias (BN after the first two), sigmoid."""
    m = attnpool.SpatioTemporalAttention(6, (5, 4))
    convs = [layer for layer in m.mask_net if isinstance(layer, torch.nn.Conv2d)]
    assert [c.bias for c in convs] == [None, None, None]
    assert [tuple(c.weight.shape) for c in convs] == [(5, 6, 3, 3), (4, 5, 3, 3), (1, 4, 3, 3)]
    assert not any(k.endswith(".bias") and k.startswith(("mask_net.0", "mask_net.3", "mask_net.6"))
                   for k in m.state_dict())


def test_backend_set_after_construction_reaches_the_regularizer():
    m = attnpool.SpatioTemporalAttention(4, (3, 2))
    m.backend = "reference"
    assert m.regularizer.backend == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        m.backend = "nope"
        m.regularizer(torch.rand(1, 3, 2, 2), torch.softmax(torch.randn(1, 3), 1))


def test_regularizer_dtype_error_names_the_mask():
    mask, w = make_mask_w(2, 3, 2, 2, seed=1)
    with pytest.raises(TypeError, match=r"w has dtype torch.float32 but mask has torch.float64"):
        AF.st_regularizer(mask, w.float())
