"""Interaction-aware pyramid attention (our formulation of Du et al.; docs/design.md, "Pyramid
attention"): every backend against the float64 reference, forward and every gradient
(docs/design.md, "Tests and tolerances", "Bad input")."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_same_with_threads, backends_for, rounded_to, torch_ops
from hypothesis import given
from hypothesis import strategies as st
from op_suite import OpSuite

import attnpool
from attnpool import backends, reference
from attnpool import functional as AF

BACKENDS = backends_for("pyramid_attention", "cpu", torch.float64)



class TestPyramidAttentionSuite(OpSuite):
    """The shared suite (tests/op_suite.py) on two levels of images."""

    op = "pyramid_attention"

    def inputs(self, B, seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*shape, generator=g, dtype=torch.float64)
                for shape in ((B, 3, 6, 4), (B, 4, 3, 2), (3,), (4,), (2,))]

    def call(self, backend, x0, x1, w0, w1, bias):
        return AF.pyramid_attention([x0, x1], [w0, w1], bias, diversity_weight=0.7,
                                    backend=backend)


def make_case(B, T, levels, seed, layout="contiguous"):
    """Maps (clips when T is not None) with levels = [(C, H, W), ...], weights, bias,
    the output and loss weights, all float64."""
    g = torch.Generator().manual_seed(seed)
    maps = []
    for C, H, W in levels:
        lead = (B,) if T is None else (B, T)
        if layout == "transposed":  # H and W strides swapped
            x = torch.randn(*lead, C, W, H, generator=g, dtype=torch.float64).transpose(-1, -2)
        else:
            x = torch.randn(*lead, C, H, W, generator=g, dtype=torch.float64)
            if layout == "channels_last" and T is None:
                x = x.to(memory_format=torch.channels_last)
        maps.append(x)
    weights = [torch.randn(C, generator=g, dtype=torch.float64) for C, _, _ in levels]
    bias = torch.randn(len(levels), generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, sum(C for C, _, _ in levels), generator=g, dtype=torch.float64)
    return maps, weights, bias, grad_out


def run(case, backend, dtype, eps=1e-12, lam=0.7, grad_loss=1.3):
    maps, weights, bias, grad_out = case
    maps = [m.detach().clone().to(dtype).requires_grad_() for m in maps]
    weights = [w.detach().clone().to(dtype).requires_grad_() for w in weights]
    bias = bias.detach().clone().to(dtype).requires_grad_()
    out, loss = AF.pyramid_attention(maps, weights, bias, eps, lam, backend=backend)
    grads = torch.autograd.grad((out * grad_out.to(dtype)).sum() + grad_loss * loss,
                                maps + weights + [bias])
    S = len(maps)
    result = {"out": out.detach(), "loss": loss.detach(), "grad_param_bias": grads[-1]}
    if backend == "reference":  # the loss's two terms, apart: the scale its rounding has
        with torch.no_grad():
            _, variance = AF.pyramid_attention(maps, weights, bias, eps, 0.0, backend=backend)
        result["_loss_terms"] = torch.stack([variance.abs(), (loss.detach() - variance).abs()])
    for s in range(S):
        result[f"grad_map{s}"] = grads[s]
        result[f"grad_param_weight{s}"] = grads[S + s]
    return result


def compare(got, ref, ref_lowp, label):
    """Every output and gradient against the float64 reference, tensor by tensor, with
    gradients measured norm-wise per kind (maps; weights and bias): a gradient can be exactly
    0 in exact arithmetic (a 1x1 level upsampled: the softmax's gradient sums to 0 over its
    positions) or cancel to far below the terms it sums (a weight's gradient, sum_i gy_i P_i,
    can be 1/20 of its terms), so each is measured against the largest gradient of its kind.
    The loss, a difference of two terms, is measured against a tenth of the larger term."""
    def kind(name):
        return name.rstrip("0123456789").removesuffix("_weight").removesuffix("_bias")

    for name in (k for k in ref if not k.startswith("_")):
        peers = [ref[k][torch.isfinite(ref[k])] for k in ref if kind(k) == kind(name)]
        share = 1.0
        if name == "loss":
            peers, share = [ref["_loss_terms"][torch.isfinite(ref["_loss_terms"])]], 0.1
        floor = share * max((p.abs().max().item() for p in peers if p.numel()), default=0.0)
        assert got[name].dtype == ref_lowp[name].dtype, name
        assert_close(got[name], ref[name], f"{label}/{name}", ref_lowp[name], scale_floor=floor)


level = st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9))


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.integers(1, 3), T=st.none() | st.integers(1, 3), levels=st.lists(level, min_size=1, max_size=4),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed"]),
       eps=st.sampled_from([1e-12, 3.0]), lam=st.sampled_from([0.0, 0.7]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_matches_reference(backend, B, T, levels, layout, eps, lam, dtype, seed):
    """Any sizes, including H_s < H_last, non-divisible (overlapping) windows and n = 1;
    eps = 3 puts some levels' score norms under eps (the clamped branch)."""
    case = make_case(B, T, levels, seed, layout)
    ref = run(case, "reference", torch.float64, eps, lam)
    ref_lowp = run(case, "reference", dtype, eps, lam)
    got = run(case, backend, dtype, eps, lam)
    compare(got, ref, ref_lowp, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", [
    [(3, 56, 56), (2, 28, 28), (2, 14, 14), (2, 16, 16), (2, 7, 7)],   # the paper's pyramid
    [(2, 64, 48), (2, 32, 32), (2, 20, 16), (1, 16, 16)],              # other window widths
], ids=["pyramid-to-7", "to-16"])
def test_large_maps_match_reference(backend, levels):
    """Maps wide enough for the kernels' whole-window fast paths (window widths 1, 2, 4, 8
    over 8 or 16 columns), next to sizes the windows do not divide."""
    case = make_case(2, None, levels, seed=11)
    ref = run(case, "reference", torch.float64)
    for dtype in (torch.float64, torch.float32):
        ref_lowp = run(case, "reference", dtype)
        compare(run(case, backend, dtype), ref, ref_lowp, f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean", [5.0, 50.0])
def test_large_channel_means(backend, mean):
    """Maps far from zero mean: the PCA term, the softmax's and the bias's gradients cancel
    the channel means; fp32 must stay within the float64 rules."""
    maps, weights, bias, grad_out = make_case(2, None, [(16, 14, 14), (40, 7, 7)], seed=12)
    case = ([m + mean for m in maps], weights, bias, grad_out)
    ref = run(case, "reference", torch.float64)
    compare(run(case, backend, torch.float32), ref, run(case, "reference", torch.float32),
            f"{backend}/mean{mean}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_channels(backend):
    """More channels than a kernel's channel block (several blocks and a ragged last one)."""
    case = make_case(2, 2, [(40, 9, 9), (70, 5, 5), (33, 3, 3)], seed=13)
    ref = run(case, "reference", torch.float64)
    for dtype in (torch.float64, torch.float32):
        compare(run(case, backend, dtype), ref, run(case, "reference", dtype), f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 5])
def test_levels_of_several_head_chunks(backend, B):
    """Levels of more channels than a cpp head chunk (256): sums over channels go by chunks.
    B=1 runs the heads' steps over (sample, chunk) items across the threads, B=5 a task per
    sample; both against the reference, and (cpp) bitwise the same with 1, 2 and 3 threads."""
    case = make_case(B, None, [(20, 8, 8), (600, 4, 4), (257, 2, 2)], seed=14)
    ref = run(case, "reference", torch.float64)
    compare(run(case, backend, torch.float32), ref, run(case, "reference", torch.float32),
            f"{backend}/B={B}")
    if backend != "cpp":
        return
    assert_same_with_threads(lambda: run(case, backend, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    if backends.why_not("pyramid_attention", backend, torch.device("cpu"), dtype):
        pytest.skip(f"{backend} has no {dtype} here (the Triton interpreter has no bfloat16)")
    case = make_case(2, None, [(24, 16, 16), (40, 8, 8), (48, 4, 4)], seed=3)
    ref = run(case, "reference", torch.float64)
    compare(run(case, backend, dtype), ref, run(case, "reference", dtype), f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("T", [None, 2])
def test_gradcheck(backend, T):
    maps, weights, bias, _ = make_case(2, T, [(2, 5, 4), (2, 3, 3), (1, 2, 2)], seed=4)
    inputs = tuple(t.requires_grad_() for t in maps + weights + [bias])

    def fn(*a):
        out, loss = AF.pyramid_attention(list(a[:3]), list(a[3:6]), a[6], 1e-12, 0.7,
                                         backend=backend)
        return out, loss

    # the interpreter runs a kernel in about a second: Triton checks random directions
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    maps, weights, bias, grad_out = make_case(2, 2, [(3, 5, 4), (2, 3, 3)], seed=5)
    maps = [m.requires_grad_() for m in maps]
    weights = [w.requires_grad_() for w in weights]
    bias.requires_grad_()
    torch.library.opcheck(torch_ops(backend).pyramid_attention.default,
                          (maps, weights, bias, 1e-12, 0.7, backend))
    _, _, pooled, y = torch_ops(backend).pyramid_attention(maps, weights, bias, 1e-12, 0.7, backend)
    torch.library.opcheck(torch_ops(backend).pyramid_attention_backward.default,
                          (grad_out, torch.tensor(1.3, dtype=torch.float64), pooled, y,
                           [w.detach() for w in weights], 1e-12, 0.7, [5, 4, 3, 3], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    case = make_case(3, 2, [(5, 9, 7), (4, 4, 3)], seed=6)
    first = run(case, backend, torch.float32)
    second = run(case, backend, torch.float32)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_as_reference(backend):
    case = make_case(2, None, [(3, 6, 6), (2, 3, 3)], seed=7)
    case[0][0][1, 2, 4, 1] = float("nan")  # sample 1 only
    ref = run(case, "reference", torch.float64)
    compare(run(case, backend, torch.float64), ref, ref, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_grad_out_propagates_as_reference(backend):
    case = make_case(2, None, [(3, 6, 6), (2, 3, 3)], seed=7)
    case[3][1, 3] = float("nan")
    ref = run(case, "reference", torch.float64)
    compare(run(case, backend, torch.float64), ref, ref, backend)


# ------------------------------------------------------------------ module
def test_module_state_dict_and_outputs_match_reference():
    torch.manual_seed(0)
    fused = attnpool.PyramidAttention([4, 6, 3], diversity_weight=0.5).double()
    ref = reference.PyramidAttention([4, 6, 3], diversity_weight=0.5).double()
    assert fused.state_dict().keys() == ref.state_dict().keys()
    assert [tuple(w.shape) for w in fused.score_weights] == [(4,), (6,), (3,)]
    assert fused.score_bias.shape == (3,)
    ref.load_state_dict(fused.state_dict())
    maps = [torch.randn(2, c, h, h, dtype=torch.float64, requires_grad=True)
            for c, h in ((4, 12), (6, 6), (3, 3))]
    outs = []
    for m in (fused, ref):
        out, loss = m(maps, return_loss=True)
        assert torch.equal(m(maps), out)
        outs.append((out, loss, *torch.autograd.grad(out.square().sum() + loss,
                                                     maps + list(m.parameters()))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_module_compile_fullgraph():
    torch._dynamo.reset()
    m = attnpool.PyramidAttention([3, 4])
    maps = [torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(2, 4, 3, 3)]
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out, loss = compiled(maps, return_loss=True)
    want_out, want_loss = m(maps, return_loss=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(loss, want_loss)
    (out.sum() + loss).backward()
    assert maps[0].grad is not None


# ------------------------------------------------------------------ backend limits
def test_cuda_level_limit_is_declared_by_the_op(monkeypatch):
    """The CUDA kernels take at most 8 levels: available() says so for 9 (not for 8), auto
    passes over cuda there, and an explicit cuda raises naming the limit. The device checks
    are stubbed so that this runs without a GPU."""
    from attnpool import pyramid_attention as pa

    cuda = torch.device("cuda")
    assert pa.CUDA_MAX_LEVELS == 8
    reason = attnpool.available("pyramid_attention", cuda, torch.float32, levels=9)["cuda"]
    assert reason is not None and "at most 8 levels" in reason, reason
    ok = attnpool.available("pyramid_attention", cuda, torch.float32, levels=8)["cuda"]
    assert ok is None or "at most" not in ok
    assert pa.limits("cuda", cuda, torch.float32, levels=9) is not None
    assert pa.limits("triton", cuda, torch.float32, levels=9) is None
    assert pa.limits("cuda", cuda, torch.float32) is None  # no size given: not checked

    real = backends.why_not

    def why_not(op, backend, device, dtype, **sizes):  # a machine where cuda and triton run
        if backend in ("cuda", "triton") and device.type == "cuda":
            limits = backends._LIMITS.get(op)
            return None if limits is None else limits(backend, device, dtype, **sizes)
        return real(op, backend, device, dtype, **sizes)

    monkeypatch.setattr(backends, "why_not", why_not)
    assert backends.resolve("pyramid_attention", "auto", cuda, torch.float32, levels=9) == "triton"
    assert backends.resolve("pyramid_attention", "auto", cuda, torch.float32, levels=8) == "cuda"
    with pytest.raises(attnpool.BackendUnavailableError, match="at most 8 levels"):
        backends.resolve("pyramid_attention", "cuda", cuda, torch.float32, levels=9)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_bad_input(backend):
    m = attnpool.PyramidAttention([3, 4], backend=backend).double()
    a, b = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="maps must be a list of 2 tensors"):
        m(a)
    with pytest.raises(ValueError, match="maps must hold 2 levels"):
        m([a])
    with pytest.raises(ValueError, match=r"maps\[1\] must have shape \[2, 4, H, W\]"):
        m([a, b[:1]])
    with pytest.raises(ValueError, match=r"maps\[1\] must have shape \[2, 4, H, W\]"):
        m([a, b[:, :3]])
    with pytest.raises(ValueError, match=r"maps\[0\] must be \[B, C, H, W\] or \[B, T, C, H, W\]"):
        m([a[0], b])
    with pytest.raises(ValueError, match=r"maps\[1\] must have shape \[2, 1, 4, H, W\]"):
        m([a.unsqueeze(1), b])
    with pytest.raises(TypeError, match=r"maps\[1\] must have maps\[0\]'s dtype"):
        m([a, b.float()])
    with pytest.raises(ValueError, match=r"score_bias must have shape \[2\]"):
        AF.pyramid_attention([a, b], list(m.score_weights), m.score_bias[:1], backend=backend)
    with pytest.raises(TypeError, match="score_weights must be a list"):
        AF.pyramid_attention([a, b], m.score_bias, m.score_bias, backend=backend)
    with pytest.raises(ValueError, match="in_channels must be a non-empty list"):
        attnpool.PyramidAttention([])
    weights = list(m.score_weights)
    with pytest.raises(TypeError, match=r"score_bias must be a Tensor of shape \[2\]"):
        AF.pyramid_attention([a, b], weights, None, backend=backend)
    with pytest.raises(ValueError, match="score_weights must hold one"):
        AF.pyramid_attention([a, b], weights[:1], m.score_bias[:1], backend=backend)
    with pytest.raises(TypeError, match=r"score_weights\[1\] has dtype torch.float32"):
        AF.pyramid_attention([a, b], [weights[0], weights[1].float()], m.score_bias,
                             backend=backend)
    with pytest.raises(TypeError, match=r"maps\[0\] must be a floating-point tensor"):
        m([a.long(), b])


# ------------------------------------------------------------------ GPU
def cpu(result):
    return {k: v.cpu() for k, v in result.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(backend, dtype):
    if backend not in backends_for("pyramid_attention", "cuda", dtype):
        pytest.skip(f"{backend} not available on this GPU build")
    case = make_case(4, None, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)], seed=9)
    ref = run(rounded_to(case, dtype), "reference", torch.float64)
    cuda_case = tuple([t.cuda() for t in part] if isinstance(part, list) else part.cuda()
                      for part in case)
    ref_lowp = run(cuda_case, "reference", dtype)
    got = run(cuda_case, backend, dtype)
    compare(cpu(got), ref, cpu(ref_lowp), f"{backend}/{dtype}")
    clip_case = make_case(2, 3, [(32, 14, 14), (64, 7, 7)], seed=10)
    ref = run(rounded_to(clip_case, dtype), "reference", torch.float64)
    cuda_case = tuple([t.cuda() for t in part] if isinstance(part, list) else part.cuda()
                      for part in clip_case)
    got = run(cuda_case, backend, dtype)
    ref_lowp = run(cuda_case, "reference", dtype)
    compare(cpu(got), ref, cpu(ref_lowp), f"{backend}/{dtype}/clip")
    # bitwise reproducible on the device too (a race between warps would show here)
    again = run(cuda_case, backend, dtype)
    for name in got:
        assert torch.equal(got[name], again[name]), name
