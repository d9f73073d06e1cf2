"""Attention clusters: every backend against the float64 reference (docs/design.md,
"Attention clusters", "Tests and tolerances", "Bad input")."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, assert_same_with_threads, backends_for, rounded_to, torch_ops
from hypothesis import given
from hypothesis import strategies as st
from op_suite import OpSuite

import attnpool
from attnpool import functional as AF
from attnpool import reference

OP = "attention_cluster"
CPU_BACKENDS = backends_for(OP, "cpu", torch.float64)


class TestAttentionClusterSuite(OpSuite):
    """The shared suite (tests/op_suite.py) on fc1 clusters with padded frames."""

    op = OP
    scale_floors = {4: 1.0}  # the bias gradient: exactly 0 (the softmax cancels the bias)

    def inputs(self, B, seed):
        g = torch.Generator().manual_seed(seed)
        L, F, N = 5, 6, 3
        x = torch.randn(B, L, F, generator=g, dtype=torch.float64)
        weight = torch.randn(N, F, generator=g, dtype=torch.float64)
        bias = torch.randn(N, generator=g, dtype=torch.float64)
        alpha = torch.randn(N, generator=g, dtype=torch.float64)
        beta = torch.randn(N, generator=g, dtype=torch.float64)
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        return [x, weight, bias, alpha, beta, lengths]

    def call(self, backend, x, weight, bias, alpha, beta, lengths):
        return AF.attention_cluster(x, weight, bias, alpha, beta, lengths, backend=backend)


def make_case(B, L, F, N, *, attention="fc1", shift=True, lengths=False, strided=False,
              dtype=torch.float64, device="cpu", seed=0, hidden=None):
    """A reference module with random (non-zero) parameters, inputs, and output grads."""
    g = torch.Generator().manual_seed(seed)
    mod = reference.AttentionCluster(F, N, attention=attention, shift=shift,
                                     hidden_features=hidden, dtype=torch.float64)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    if strided:  # a non-contiguous x: every other frame of a wider tensor, transposed
        x = torch.randn(B, F, 2 * L, generator=g, dtype=torch.float64)[:, :, ::2].transpose(1, 2)
    else:
        x = torch.randn(B, L, F, generator=g, dtype=torch.float64)
    lens = torch.randint(1, L + 1, (B,), generator=g) if lengths else None
    grad_out = torch.randn(B, N * F, generator=g, dtype=torch.float64)
    grad_attn = torch.randn(B, N, L, generator=g, dtype=torch.float64)
    return mod, x, lens, grad_out, grad_attn


def run(mod, x, lens, grad_out, grad_attn, *, backend, dtype, device="cpu"):
    """Forward + backward of the functional op; returns outputs and every gradient."""
    mod = copy.deepcopy(mod).to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    params = dict(mod.named_parameters())
    out, attn = AF.attention_cluster(
        x, mod.weight, mod.bias, mod.alpha, mod.beta,
        None if lens is None else lens.to(device),
        attention=mod.attention, weight1=mod.weight1, bias1=mod.bias1, shift=mod.shift,
        backend=backend)
    inputs = [x] + list(params.values())
    outs, gouts = [out], [grad_out.to(device, dtype)]
    if attn.requires_grad:  # "average" attention has no parameters behind it
        outs.append(attn)
        gouts.append(grad_attn.to(device, dtype))
    grads = torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
    result = {"out": out, "attention": attn, "grad_x": grads[0]}
    for (name, p), gp in zip(params.items(), grads[1:]):
        result[f"grad_{name}"] = torch.zeros_like(p) if gp is None else gp
    return {k: v.detach().cpu() for k, v in result.items()}


def check_backend(case, backend, dtype, device="cpu", x=None):
    """``x``: the backend's input instead of the case's (the reference keeps the case's)."""
    lowp = dtype in (torch.float16, torch.bfloat16)
    ref64 = run(*(rounded_to(case, dtype) if lowp else case), backend="reference",
                dtype=torch.float64)
    # the reference at the same dtype: low precision must stay within 2x its error; fp32 within
    # 1e-5 relative or, where the problem is ill-conditioned, within 2x the fp32 reference's error
    ref_lowp = run(*case, backend="reference", dtype=dtype, device=device) \
        if dtype != torch.float64 else {}
    got = run(case[0], case[1] if x is None else x, *case[2:], backend=backend, dtype=dtype,
              device=device)
    # A parameter gradient can cancel far below the terms it sums (scores gradients through
    # a softmax over two frames, say): each is measured against at least a tenth of the
    # module's largest parameter gradient.
    params = [k for k in ref64 if k.startswith("grad_") and k not in ("grad_x", "grad_bias")]
    floor = 0.1 * max((ref64[k].abs().max().item() for k in params), default=0.0)
    if floor == 0.0 and case[3].numel():  # all vanish exactly (F = 1): the terms they
        floor = case[3].abs().max().item()  # cancel are grad_out-sized
    for name, ref in ref64.items():
        if name == "grad_bias":  # the softmax cancels bias: its true gradient is 0
            noise = 1e-5 * max(1.0, got["grad_weight"].abs().max())
            if lowp:  # rounding noise of the same size as the reference's at that dtype
                noise = 2 * ref_lowp[name].abs().max() + noise
            assert got[name].abs().max() <= noise
            continue
        assert got[name].dtype == dtype, name
        assert_close(got[name], ref, f"{backend}/{dtype}/{name}", ref_lowp.get(name),
                     scale_floor=floor if name in params else 0.0)


def test_expected_backends_are_here():
    """CI names the backends it built (ATTNPOOL_EXPECT_BACKENDS=cpp,triton): none may
    silently drop out of any op's parametrised tests."""
    expected = [b for b in os.environ.get("ATTNPOOL_EXPECT_BACKENDS", "").split(",") if b]
    for op in ("attention_cluster", "attentional_pooling", "weighted_pool", "st_regularizer",
               "pyramid_attention"):
        for b in expected:
            reason = attnpool.available(op, torch.device("cpu"), torch.float64)[b]
            assert reason is None, f"{op}/{b}: {reason}"


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    # F=1 with shift makes every gradient exactly 0: covered by test_single_feature
    B=st.integers(0, 3), L=st.integers(1, 7), F=st.integers(2, 9), N=st.integers(1, 4),
    attention=st.sampled_from(["fc1", "fc2", "average"]), shift=st.booleans(),
    lengths=st.booleans(), strided=st.booleans(), dtype=st.sampled_from([torch.float32,
                                                                          torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(backend, B, L, F, N, attention, shift, lengths, strided, dtype, seed):
    case = make_case(B, L, F, N, attention=attention, shift=shift, lengths=lengths,
                     strided=strided, seed=seed, hidden=3)
    check_backend(case, backend, dtype)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu(backend, dtype):
    case = make_case(3, 9, 33, 5, lengths=True, seed=7)
    check_backend(case, backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_larger_than_one_tile(backend):
    """F, L and N beyond one block of the kernels, with padding."""
    case = make_case(2, 37, 300, 20, lengths=True, seed=3)
    check_backend(case, backend, torch.float32)
    # 130 units: the cpp backward's grad_x gemm packs [DU; W] (2N >= 256 rows, at most 64
    # frames; B=8 keeps a task per sample up to 4 threads, 20 frames make several panels)
    many = make_case(8, 20, 40, 130, lengths=True, seed=6)
    check_backend(many, backend, torch.float32)
    if backend == "cpp":
        assert_same_with_threads(lambda: run(*many, backend=backend, dtype=torch.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths", [None, [70], [100, 70, 30, 64, 63, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_frames(backend, lengths, dtype):
    """100 frames: the cpp backward's d attention as a gemm (64 valid frames or more, with
    padding at 70) or as dot tiles (fewer), one sample's units split over the threads (B=1);
    B*L = 600 frames: the weight gradient sums them in several L1-sized chunks on every
    instruction set (WeightGradJob), over a full and a partial column block, and 20 units
    make several row panels."""
    B = 6 if lengths is None else len(lengths)
    mod, x, _, go, ga = make_case(B, 100, 40, 20, seed=4)
    lens = None if lengths is None else torch.tensor(lengths)
    check_backend((mod, x, lens, go, ga), backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("attention,shift", [("fc1", True), ("fc2", True), ("average", True),
                                             ("fc1", False)])
def test_long_clips(backend, attention, shift):
    """Samples of 512 KiB of valid frames or more take the cpp forward's long-clip path
    (kLongClipBytes: V = A X as one gemm per task, then the per-unit epilogue), a short one
    the panel path: against the reference under every scoring layer and without shift. 300
    and 260 frames cross the gemm's chunks of K, F = 521 leaves a vector and a scalar tail,
    and 40 units split into blocks that change with the thread count at B=1: (cpp) bitwise
    the same with 1, 2 and 3 threads."""
    mod, x, _, go, ga = make_case(3, 300, 521, 40, attention=attention, shift=shift, hidden=4,
                                  seed=5)
    with torch.no_grad():  # scores of order 1, as with the default init (unit weights over
        for w in (mod.weight, mod.weight1):  # 521 features would make them ~23)
            if w is not None:
                w.mul_(w.shape[1] ** -0.5)
    lens = torch.tensor([300, 260, 20])  # 260 frames of 521 floats: 529 KiB
    check_backend((mod, x, lens, go, ga), backend, torch.float32)
    # the cpp kernels' own promise; fc2's hidden layer runs through torch, whose GEMMs may
    # change bits with the thread count (as may Triton's wrapper)
    if backend != "cpp" or attention == "fc2":
        return
    assert_same_with_threads(lambda: run(mod, x[:1], lens[:1], go[:1], ga[:1], backend=backend,
                                         dtype=torch.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clamped_norm(backend):
    """alpha = beta = 0 makes the norm 0 < eps: the clamped branch."""
    mod, x, lens, go, ga = make_case(2, 4, 5, 3, seed=1)
    with torch.no_grad():
        mod.alpha[1] = 0.0
        mod.beta[1] = 0.0
    check_backend((mod, x, lens, go, ga), backend, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("eps_placement,eps", [("sqrt", 1e-3), ("clamp", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_placements_and_a_zero_unit(backend, eps_placement, eps, dtype):
    """Gradients under both eps placements, large enough to matter, with unit 1 at u = 0
    (alpha = beta = 0: under "sqrt" its output is 0 and its norm sqrt(eps), under "clamp" the
    norm is clamped). The cpp fc1 backward derives du from the output (no projection where
    the output is 0)."""
    mod, x, lens, go, _ = make_case(3, 6, 20, 3, lengths=True, seed=9)
    with torch.no_grad():
        mod.alpha[1] = 0.0
        mod.beta[1] = 0.0

    def grads(backend, dtype):
        m = copy.deepcopy(mod).to(dtype)
        xx = x.to(dtype).requires_grad_()
        out, _ = AF.attention_cluster(xx, m.weight, m.bias, m.alpha, m.beta, lens, eps=eps,
                                      eps_placement=eps_placement, backend=backend)
        names = ["out", "grad_x", "grad_weight", "grad_alpha", "grad_beta"]
        got = [out] + list(torch.autograd.grad(out, [xx, m.weight, m.alpha, m.beta],
                                               go.to(dtype)))
        return dict(zip(names, (t.detach() for t in got)))

    ref = grads("reference", torch.float64)
    ref_lowp = grads("reference", dtype)
    got = grads(backend, dtype)
    floor = 0.1 * max(ref[k].abs().max().item() for k in ("grad_weight", "grad_alpha",
                                                           "grad_beta"))
    for name in ref:
        assert_close(got[name], ref[name], f"{backend}/{eps_placement}/{name}", ref_lowp[name],
                     scale_floor=floor if name != "out" and name != "grad_x" else 0.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates(backend):
    mod, x, lens, go, ga = make_case(3, 4, 6, 2, seed=2)
    x[1, 2, 3] = float("nan")
    x[2, 0, 0] = float("inf")
    ref = run(mod, x, lens, go, ga, backend="reference", dtype=torch.float64)
    got = run(mod, x, lens, go, ga, backend=backend, dtype=torch.float64)
    for name in ("out", "attention"):
        assert torch.equal(torch.isnan(got[name]), torch.isnan(ref[name])), name
    assert torch.isfinite(got["out"][0]).all()  # the clean sample stays clean


# ------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("shift", [True, False])
def test_gradcheck(backend, shift):
    mod, x, lens, _, _ = make_case(2, 4, 5, 3, attention="fc2", shift=shift, lengths=True,
                                   seed=4, hidden=3)
    x.requires_grad_()
    params = [mod.weight, mod.alpha, mod.beta, mod.weight1, mod.bias1]

    def f(x, weight, alpha, beta, weight1, bias1):
        return AF.attention_cluster(x, weight, mod.bias, alpha, beta, lens, attention="fc2",
                                    weight1=weight1, bias1=bias1, shift=shift, backend=backend)

    assert torch.autograd.gradcheck(f, (x, *params))


# ------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("eps", [(1e-12, 0.0), (0.0, 1e-12)], ids=["clamp", "sqrt"])
def test_opcheck(backend, lengths, eps):
    g = torch.Generator().manual_seed(5)
    B, L, F, N = 2, 5, 7, 3
    x = torch.randn(B, L, F, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(B, L, N, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    lens = torch.tensor([5, 2]) if lengths else None
    weight = torch.randn(N, F, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch_ops(backend).attention_cluster.default,
                          (x, scores, None, None, lens, alpha, beta, True, *eps, backend))
    torch.library.opcheck(torch_ops(backend).attention_cluster.default,  # the fused scoring layer
                          (x, None, weight, bias, lens, alpha, beta, True, *eps, backend))
    out, attn, norm = torch_ops(backend).attention_cluster(x, scores, None, None, lens, alpha, beta,
                                                      True, *eps, backend)
    grad_out = torch.randn(B, N * F, generator=g, dtype=torch.float64)
    torch.library.opcheck(
        torch_ops(backend).attention_cluster_backward.default,
        (grad_out, x.detach(), attn.detach(), norm, alpha.detach(), beta.detach(), lens, True,
         *eps, backend))
    if backend == "cpp":  # the fused scoring layer's backward
        out, attn, norm = torch_ops(backend).attention_cluster(x, None, weight, bias, lens, alpha,
                                                          beta, True, *eps, backend)
        grad_attn = torch.randn(B, N, L, generator=g, dtype=torch.float64)
        for ga in (None, grad_attn):
            torch.library.opcheck(
                torch_ops(backend).attention_cluster_fc1_backward.default,
                (grad_out, ga, x.detach(), weight.detach(), out.detach(), attn.detach(), norm,
                 alpha.detach(), beta.detach(), lens, True, *eps, backend))


# ------------------------------------------------------------------ compile
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    m = attnpool.AttentionCluster(6, 3, attention="fc2", hidden_features=4, backend=backend)
    x = torch.randn(2, 5, 6, requires_grad=True)
    lens = torch.tensor([5, 3])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x, lens)
    ref = m(x, lens)
    torch.testing.assert_close(out, ref)
    (gc,) = torch.autograd.grad(out.square().sum(), x)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gc, gr)


def test_compile_inductor():
    backend = CPU_BACKENDS[0] if CPU_BACKENDS else "reference"
    torch._dynamo.reset()
    m = attnpool.AttentionCluster(8, 4, backend=backend)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))


# ------------------------------------------------------------------ module API
def test_state_dict_matches_reference():
    for attention in ("fc1", "fc2", "average"):
        fused = attnpool.AttentionCluster(16, 4, attention=attention, hidden_features=8)
        ref = reference.AttentionCluster(16, 4, attention=attention, hidden_features=8)
        assert fused.state_dict().keys() == ref.state_dict().keys()
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(2, 3, 16)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)


def test_initialisation_follows_official_code():
    torch.manual_seed(0)
    m = attnpool.AttentionCluster(512, 256)
    std = 256 ** -0.25
    assert abs(m.alpha.std().item() - std) < 0.15 * std
    assert abs(m.beta.std().item() - std) < 0.15 * std
    assert abs(m.weight.std().item() - (2 / 512) ** 0.5) < 0.05 * (2 / 512) ** 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multimodal(backend):
    torch.manual_seed(1)
    mm = attnpool.MultimodalAttentionClusters({"rgb": (8, 3), "audio": (4, 2)}, backend=backend)
    rgb, audio = torch.randn(2, 5, 8), torch.randn(2, 7, 4)
    lens = {"audio": torch.tensor([7, 3])}
    out = mm({"rgb": rgb, "audio": audio}, lens)
    assert out.shape == (2, 3 * 8 + 2 * 4)
    expect = torch.cat([mm.clusters["rgb"](rgb), mm.clusters["audio"](audio, lens["audio"])], -1)
    torch.testing.assert_close(out, expect)
    ref = reference.MultimodalAttentionClusters({"rgb": (8, 3), "audio": (4, 2)})
    ref.load_state_dict(mm.state_dict())
    torch.testing.assert_close(out, ref({"rgb": rgb, "audio": audio}, lens), rtol=1e-5,
                               atol=1e-6)


def test_return_attention_sums_to_one_over_valid_frames():
    m = attnpool.AttentionCluster(6, 3)
    out, attn = m(torch.randn(2, 5, 6), torch.tensor([5, 2]), return_attention=True)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3))
    assert attn[1, :, 2:].abs().max() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    mod, x, lens, go, ga = make_case(3, 9, 40, 6, lengths=True, seed=9)
    a = run(mod, x, lens, go, ga, backend=backend, dtype=torch.float32)
    b = run(mod, x, lens, go, ga, backend=backend, dtype=torch.float32)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_raises(backend):
    m = attnpool.AttentionCluster(4, 2, backend=backend).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ------------------------------------------------------------------ backends
def test_backend_choice_and_errors(monkeypatch):
    m = attnpool.AttentionCluster(4, 2)
    x = torch.randn(2, 3, 4)
    with pytest.raises(attnpool.BackendUnavailableError, match="cuda: "):
        AF.attention_cluster(x, m.weight, m.bias, m.alpha, m.beta, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        attnpool.AttentionCluster(4, 2, backend="fast")(x)
    with attnpool.use_backend("reference"):
        torch.testing.assert_close(m(x), reference.AttentionCluster.forward(m, x))
    monkeypatch.setenv("ATTNPOOL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ATTNPOOL_BACKEND"):
        m(x)


def test_import_without_extension_warns_and_falls_back():
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'attnpool._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, attnpool\n"
        "assert any('attnpool._C' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "from attnpool import backends\n"
        "assert backends.resolve('attention_cluster', None, torch.device('cpu'), torch.float32)"
        " == 'reference'\n"
        "print(attnpool.AttentionCluster(4, 2)(torch.randn(1, 3, 4)).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNPOOL_BACKEND", "TRITON_INTERPRET")}
    env["ATTNPOOL_NO_JIT"] = "1"  # no build on first use either (CI tests that one apart)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 8])" in res.stdout


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_bad_input(backend):
    m = attnpool.AttentionCluster(4, 2, backend=backend)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, L, F\]"):
        m(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"x must have shape \[B, L, 4\]"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"alpha must have shape \[N\]"):
        AF.attention_cluster(x, m.weight, m.bias, m.alpha[None], m.beta)
    with pytest.raises(ValueError, match=r"beta must have shape \[2\]"):
        AF.attention_cluster(x, m.weight, m.bias, m.alpha, m.beta[:1])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        m(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        m(x.double())
    with pytest.raises(TypeError, match="lengths must be an integer"):
        m(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lengths must have shape \[B=2\]"):
        m(x, torch.tensor([1, 2, 3]))
    for bad in ([0, 2], [1, 4]):
        with pytest.raises(ValueError, match=r"lengths must lie in \[1, L=3\]"):
            m(x, torch.tensor(bad))
    with pytest.raises(ValueError, match="on meta"):
        m(x.to("meta"))
    with pytest.raises(ValueError, match="L >= 1"):
        m(torch.randn(2, 0, 4))
    with pytest.raises(ValueError, match="attention must be one of"):
        attnpool.AttentionCluster(4, 2, attention="fc3")


# ------------------------------------------------------------------ GPU
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 25, 129, 7), (4, 300, 2048, 64)])
def test_gpu_matches_reference(backend, dtype, shape):
    if backends_for(OP, "cuda", dtype).count(backend) == 0:
        pytest.skip(f"{backend} not available on this GPU build")
    case = make_case(*shape, lengths=True, seed=11)
    check_backend(case, backend, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic(backend):
    mod, x, lens, go, ga = make_case(8, 25, 512, 16, lengths=True, seed=12)
    a = run(mod, x, lens, go, ga, backend=backend, dtype=torch.float32, device="cuda")
    b = run(mod, x, lens, go, ga, backend=backend, dtype=torch.float32, device="cuda")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_feature(backend):
    """F=1 with shift: o = ±1/√N whatever x is; the gradient through out is 0 (what is left
    comes from the returned attention), so compare with an absolute tolerance."""
    case = make_case(2, 4, 1, 3, seed=13)
    ref = run(*case, backend="reference", dtype=torch.float64)
    got = run(*case, backend=backend, dtype=torch.float64)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


# ------------------------------------------------------------------ padded frames
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("attention", ["fc1", "fc2", "average"])
# 40: several frame chunks in the Triton kernels; 100: 70 valid frames take the cpp
# backward's d-attention gemm
@pytest.mark.parametrize("L", [6, 40, 100])
def test_nan_in_padded_frames_reaches_nothing(backend, attention, L):
    """Frames past lengths are never read, forward or backward: NaN and Inf there give the
    outputs and gradients of zeros there (gradients of those frames: exactly 0)."""
    mod, x, _, go, ga = make_case(3, L, 6, 2, attention=attention, hidden=4, seed=11)
    first = 70 if L > 70 else 2
    lens = torch.tensor([first, L, 1])
    case = (mod, x.clone(), lens, go, ga)
    x[0, first:] = float("nan")
    x[2, 1:] = float("inf")
    x[2, L - 1] = -float("inf")
    check_backend(case, backend, torch.float64, x=x)
    got = run(mod, x, lens, go, ga, backend=backend, dtype=torch.float64)
    assert torch.count_nonzero(got["grad_x"][0, first:]) == 0
    assert torch.count_nonzero(got["grad_x"][2, 1:]) == 0


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("attention", ["fc1", "fc2"])
def test_without_shift_alpha_and_beta_get_no_gradient(backend, attention):
    """shift=False does not use alpha and beta: their .grad stays None (as in the reference),
    so weight decay does not move them."""
    torch.manual_seed(0)
    m = attnpool.AttentionCluster(6, 2, attention=attention, shift=False, backend=backend)
    m(torch.randn(2, 4, 6)).square().sum().backward()
    assert m.alpha.grad is None and m.beta.grad is None
    assert m.weight.grad is not None


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the cpp extension is not built")
def test_output_changed_in_place_is_an_error_not_a_wrong_gradient():
    """The cpp fc1 backward takes du from the saved output (no recompute of v): an in-place
    change of the output must raise autograd's error rather than give wrong gradients."""
    m = attnpool.AttentionCluster(6, 2, backend="cpp")
    out = m(torch.randn(2, 4, 6))
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_auto_on_cuda_prefers_the_measured_faster_kernel(monkeypatch):
    """auto's per-op order on a GPU (measured on an H200, backends.py): where every backend
    could serve, the cluster takes triton and the other ops cuda."""
    monkeypatch.setattr(attnpool.backends, "why_not", lambda *args, **sizes: None)
    cuda = torch.device("cuda")
    assert attnpool.backends.resolve(OP, "auto", cuda, torch.float32) == "triton"
    for op in ("attentional_pooling", "weighted_pool", "st_regularizer", "pyramid_attention"):
        assert attnpool.backends.resolve(op, "auto", cuda, torch.float32) == "cuda", op
    assert attnpool.backends.resolve(OP, "auto", torch.device("cpu"), torch.float32) == "cpp"
