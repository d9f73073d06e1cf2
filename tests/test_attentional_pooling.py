"""Attentional pooling: every backend against the float64 reference (DESIGN §3.2, §4, §6)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, backends_for, rounded_to
from hypothesis import given
from hypothesis import strategies as st

import attnpool
from attnpool import functional as AF
from attnpool import reference

OP = "attentional_pooling"
CPU_BACKENDS = backends_for(OP, "cpu", torch.float64)
LAYOUTS = ("nchw", "channels_last", "strided")


def make_x(shape, layout, g):
    """Random features in the given memory layout (values do not depend on the layout)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if layout == "channels_last":  # C-contiguous positions, per frame for clips
        perm = (0, 2, 3, 1) if x.dim() == 4 else (0, 1, 3, 4, 2)
        inv = (0, 3, 1, 2) if x.dim() == 4 else (0, 1, 4, 2, 3)
        x = x.permute(perm).contiguous().permute(inv)
    elif layout == "strided":  # every other column of a wider tensor: neither layout
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=torch.float64)
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x


def make_case(B, C, H, W, P, K, *, T=None, bias=True, layout="nchw", seed=0):
    """A reference module with random (non-zero) parameters, inputs, and output grads."""
    g = torch.Generator().manual_seed(seed)
    mod = reference.AttentionalPooling(C, K, rank=P, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    lead = (B,) if T is None else (B, T)
    x = make_x((*lead, C, H, W), layout, g)
    grad_logits = torch.randn(B, K, generator=g, dtype=torch.float64)
    grad_maps = torch.randn(*lead, P, H, W, generator=g, dtype=torch.float64)
    return mod, x, grad_logits, grad_maps


def run(mod, x, grad_logits, grad_maps, *, backend, dtype, device="cpu"):
    """Forward + backward of the functional op; returns outputs and every gradient."""
    mod = copy.deepcopy(mod).to(device=device, dtype=dtype)
    # .to keeps the layout (a dense tensor's strides); a non-dense x stays non-dense
    x = x.to(device=device, dtype=dtype).requires_grad_()
    params = dict(mod.named_parameters())
    logits, maps = AF.attentional_pooling(x, mod.weight_bottom_up, mod.bias_bottom_up,
                                          mod.weight_top_down, mod.bias_top_down,
                                          backend=backend)
    grads = torch.autograd.grad([logits, maps], [x, *params.values()],
                                [grad_logits.to(device, dtype), grad_maps.to(device, dtype)])
    result = {"logits": logits, "maps": maps, "grad_x": grads[0]}
    result.update({f"grad_{name}": gp for name, gp in zip(params, grads[1:])})
    return {k: v.detach().cpu() for k, v in result.items()}


def check_backend(case, backend, dtype, device="cpu"):
    lowp = dtype in (torch.float16, torch.bfloat16)
    ref64 = run(*(rounded_to(case, dtype) if lowp else case), backend="reference",
                dtype=torch.float64)
    ref_lowp = run(*case, backend="reference", dtype=dtype, device=device) \
        if dtype != torch.float64 else {}
    got = run(*case, backend=backend, dtype=dtype, device=device)
    for name, ref in ref64.items():
        assert got[name].dtype == dtype, name
        # A bias gradient sums the same per-position terms as its weight's gradient and can
        # cancel to far below them (e.g. 0.016 from five terms of ~1): it is measured against
        # at least a tenth of the layer's largest parameter gradient.
        floor = 0.0
        if name.startswith("grad_bias_"):
            layer = name.removeprefix("grad_bias_")  # bottom_up / top_down
            floor = 0.1 * max(ref64[f"grad_weight_{layer}"].abs().max().item(),
                              ref.abs().max().item())
        assert_close(got[name], ref, f"{backend}/{dtype}/{name}", ref_lowp.get(name),
                     scale_floor=floor)
    return got


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    B=st.integers(0, 3), T=st.sampled_from([None, 1, 2]), C=st.integers(1, 9),
    H=st.integers(1, 4), W=st.integers(1, 5), P=st.integers(1, 3), K=st.integers(1, 5),
    bias=st.booleans(), layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(backend, B, T, C, H, W, P, K, bias, layout, dtype, seed):
    case = make_case(B, C, H, W, P, K, T=T, bias=bias, layout=layout, seed=seed)
    check_backend(case, backend, dtype)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_low_precision_cpu(backend, dtype, layout):
    check_backend(make_case(3, 40, 7, 7, 2, 11, layout=layout, seed=7), backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_larger_than_one_tile(backend, layout):
    """C, n and P beyond one block of the kernels (several position tiles and P blocks)."""
    check_backend(make_case(2, 70, 9, 15, 33, 6, layout=layout, seed=3), backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates(backend):
    mod, x, gl, gm = make_case(3, 4, 3, 3, 2, 5, seed=2)
    x[1, 2, 1, 1] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    ref = run(mod, x, gl, gm, backend="reference", dtype=torch.float64)
    got = run(mod, x, gl, gm, backend=backend, dtype=torch.float64)
    # NaN in x: NaN wherever the reference has it. Inf: the factored form sums the infinities
    # in another order than the paper form, so an inf - inf (NaN) there may stay an Inf here;
    # what must match is where the results are not finite.
    for name in ("logits", "maps"):
        assert torch.equal(torch.isnan(got[name][1]), torch.isnan(ref[name][1])), name
        assert torch.equal(torch.isfinite(got[name]), torch.isfinite(ref[name])), name
    assert torch.isfinite(got["logits"][0]).all()  # the clean sample stays clean


# ------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(backend, layout):
    mod, x, _, _ = make_case(2, 5, 3, 2, 2, 3, T=2, layout=layout, seed=4)
    x.requires_grad_()
    params = [mod.weight_bottom_up, mod.bias_bottom_up, mod.weight_top_down, mod.bias_top_down]

    def f(*args):
        return AF.attentional_pooling(*args, backend=backend)

    assert torch.autograd.gradcheck(f, (x, *params))


# ------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(backend, layout):
    g = torch.Generator().manual_seed(5)
    B, C, n, P = 2, 5, 6, 3
    x = make_x((B, C, 2, 3), layout, g).reshape(B, C, n).requires_grad_()
    wb = torch.randn(P, C, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(P, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.attnpool.attentional_pool.default, (x, wb, bb, backend))
    z, h, _ = torch.ops.attnpool.attentional_pool(x, wb, bb, backend)
    grad_z = torch.randn(B, P, C, generator=g, dtype=torch.float64)
    grad_h = torch.randn(B, P, n, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.attnpool.attentional_pool_backward.default,
                          (grad_z, grad_h, x.detach(), h.detach(), wb.detach(), backend))


# ------------------------------------------------------------------ compile
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    m = attnpool.AttentionalPooling(6, 4, rank=2, backend=backend)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(2, 3, 6, 3, 2, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    ref = m(x)
    torch.testing.assert_close(out, ref)
    (gc,) = torch.autograd.grad(out.square().sum(), x)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gc, gr)


def test_compile_inductor():
    backend = CPU_BACKENDS[0] if CPU_BACKENDS else "reference"
    torch._dynamo.reset()
    m = attnpool.AttentionalPooling(8, 5, rank=2, backend=backend)
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))


# ------------------------------------------------------------------ module API
def test_state_dict_matches_reference():
    for kwargs in ({}, {"rank": 3, "bias": False}, {"pose_keypoints": 5, "pose_channels": 7}):
        fused = attnpool.AttentionalPooling(16, 4, **kwargs)
        ref = reference.AttentionalPooling(16, 4, **kwargs)
        assert fused.state_dict().keys() == ref.state_dict().keys()
        with torch.no_grad():
            for p in fused.parameters():
                p.normal_()
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(2, 16, 3, 3)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_initialisation_follows_official_code():
    torch.manual_seed(0)
    m = attnpool.AttentionalPooling(256, 100, rank=2)
    for w in (m.weight_bottom_up, m.weight_top_down):
        assert abs(w.std().item() - 0.001) < 1e-4
    assert torch.all(m.bias_bottom_up == 0) and torch.all(m.bias_top_down == 0)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("clip", [False, True])
def test_head_from_linear_is_exact(backend, clip):
    """avgpool + flatten + Linear == the converted head, images and clips, any layout."""
    torch.manual_seed(1)
    fc = torch.nn.Linear(12, 7).double()
    head = attnpool.swap.attentional_head_from_linear(fc, backend=backend)
    assert isinstance(head, attnpool.AttentionalPooling)
    for layout in ("nchw", "channels_last"):
        shape = (3, 4, 12, 5, 6) if clip else (3, 12, 5, 6)
        x = make_x(shape, layout, torch.Generator().manual_seed(2)).requires_grad_()
        pooled = x.mean((1, 3, 4)) if clip else x.mean((2, 3))
        want = fc(pooled)
        got = head(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(want)
        (gx_want,) = torch.autograd.grad(want, x, g)
        (gx_got,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(gx_got, gx_want, rtol=1e-12, atol=1e-12)
    no_bias = attnpool.swap.attentional_head_from_linear(torch.nn.Linear(12, 3, bias=False))
    x = torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(no_bias(x).double(), x.mean((2, 3)).double() @
                               no_bias.weight_top_down[0].double().T, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="nn.Linear"):
        attnpool.swap.attentional_head_from_linear(torch.nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("clip", [False, True])
def test_pose_variant(clip):
    """Fused module (factored form) vs reference (paper form): logits, maps, heatmaps,
    every gradient; the heatmap loss trains the pose layers."""
    torch.manual_seed(3)
    ref = reference.AttentionalPooling(10, 6, rank=2, pose_keypoints=4, pose_channels=5).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    fused = attnpool.AttentionalPooling(10, 6, rank=2, pose_keypoints=4, pose_channels=5)
    fused = fused.double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn((2, 3, 10, 4, 5) if clip else (2, 10, 4, 5), dtype=torch.float64)
    target = torch.rand(*x.shape[:-3], 4, 4, 5, dtype=torch.float64)
    outs = []
    for m in (ref, fused):
        xr = x.clone().requires_grad_()
        logits, maps, heat = m(xr, return_maps=True, return_heatmaps=True)
        assert maps.shape == (*x.shape[:-3], 2, 4, 5) and heat.shape == target.shape
        loss = logits.square().sum() + maps.sum() + m.pose_loss(heat, target)
        grads = torch.autograd.grad(loss, [xr, *m.parameters()])
        outs.append((logits, maps, heat, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert outs[1][-1].abs().sum() > 0  # heatmap_bias gets the pose loss's gradient
    with pytest.raises(ValueError, match="target must have"):
        fused.pose_loss(heat, target[..., :3])
    with pytest.raises(ValueError, match="return_heatmaps needs the pose variant"):
        attnpool.AttentionalPooling(10, 6)(x, return_heatmaps=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    case = make_case(3, 20, 5, 5, 2, 7, seed=9)
    a = run(*case, backend=backend, dtype=torch.float32)
    b = run(*case, backend=backend, dtype=torch.float32)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_raises(backend):
    m = attnpool.AttentionalPooling(4, 2, backend=backend).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_autocast_cpu_bf16():
    m = attnpool.AttentionalPooling(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, maps = m(torch.randn(2, 8, 3, 3), return_maps=True)
    assert logits.dtype == maps.dtype == torch.bfloat16


def test_backend_errors():
    m = attnpool.AttentionalPooling(4, 2)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(attnpool.BackendUnavailableError, match="cuda: "):
        AF.attentional_pooling(x, m.weight_bottom_up, m.bias_bottom_up, m.weight_top_down,
                               m.bias_top_down, backend="cuda")
    with attnpool.use_backend("reference"):
        torch.testing.assert_close(m(x), reference.AttentionalPooling.forward(m, x))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_bad_input(backend):
    m = attnpool.AttentionalPooling(4, 3, rank=2, backend=backend)
    x = torch.randn(2, 4, 3, 3)
    args = (m.weight_bottom_up, m.bias_bottom_up, m.weight_top_down, m.bias_top_down)
    with pytest.raises(ValueError, match=r"x must have shape \[B, C, H, W\] or \[B, T, C, H, W\]"):
        m(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 4, H, W\]"):
        m(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 4, H, W\]"):
        m(torch.randn(2, 2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"H, W >= 1"):
        m(torch.randn(2, 4, 0, 3))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        m(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        m(x.double())
    with pytest.raises(ValueError, match=r"bias_bottom_up must have shape \[2\]"):
        AF.attentional_pooling(x, args[0], args[1][:1], *args[2:], backend=backend)
    with pytest.raises(ValueError, match=r"weight_top_down must have shape \[2, 3, 4\]"):
        AF.attentional_pooling(x, *args[:2], args[2][:, :, :1].expand(2, 3, 1), args[3],
                               backend=backend)
    with pytest.raises(ValueError, match=r"bias_top_down must have shape \[2, 3\]"):
        AF.attentional_pooling(x, *args[:3], args[3][:1], backend=backend)
    with pytest.raises(ValueError, match="weight_bottom_up must have shape"):
        AF.attentional_pooling(x, args[0][0], *args[1:], backend=backend)
    with pytest.raises(ValueError, match="on meta"):
        m(x.to("meta"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        attnpool.AttentionalPooling(4, 3, rank=0)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_empty_batch(backend):
    m = attnpool.AttentionalPooling(4, 2, rank=2, backend=backend)
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    logits, maps = m(x, return_maps=True)
    assert logits.shape == (0, 2) and maps.shape == (0, 2, 3, 3)
    logits.sum().backward()
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------ GPU
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (3, 70, 9, 15, 33, 6),
                                   (8, 2048, 14, 14, 1, 400)])
def test_gpu_matches_reference(backend, dtype, layout, shape):
    if backend not in backends_for(OP, "cuda", dtype):
        pytest.skip(f"{backend} not available on this GPU build")
    check_backend(make_case(*shape, layout=layout, seed=11), backend, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic(backend):
    case = make_case(16, 512, 14, 14, 2, 100, seed=12)
    a = run(*case, backend=backend, dtype=torch.float32, device="cuda")
    b = run(*case, backend=backend, dtype=torch.float32, device="cuda")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_pose_bad_input(backend):
    """The pose variant's functional form checks its inputs like the plain one: errors name
    the argument and the expected shape before any kernel runs."""
    torch.manual_seed(0)
    x, q = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3)
    wb, bb, wt, bt = torch.randn(1, 5), torch.randn(1), torch.randn(1, 3, 4), torch.randn(1, 3)
    logits, maps = AF.pose_attentional_pooling(x, q, wb, bb, wt, bt, backend=backend)
    assert logits.shape == (2, 3) and maps.shape == (2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"q must have shape \[2, 5, 3, 3\]"):
        AF.pose_attentional_pooling(x, q[:, :, :2], wb, bb, wt, bt, backend=backend)
    with pytest.raises(ValueError, match=r"q must have shape \[2, 5, 3, 3\]"):
        AF.pose_attentional_pooling(x, q[:, :4], wb, bb, wt, bt, backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 4, H, W\]"):
        AF.pose_attentional_pooling(x[:, :3], q, wb, bb, wt, bt, backend=backend)
    with pytest.raises(ValueError, match=r"weight_bottom_up must have shape \[P=1, D\]"):
        AF.pose_attentional_pooling(x, q, wb[0], bb, wt, bt, backend=backend)
    with pytest.raises(ValueError, match=r"bias_bottom_up must have shape \[1\]"):
        AF.pose_attentional_pooling(x, q, wb, torch.randn(2), wt, bt, backend=backend)
    with pytest.raises(ValueError, match=r"bias_top_down must have shape \[1, 3\]"):
        AF.pose_attentional_pooling(x, q, wb, bb, wt, bt[:, :2], backend=backend)
    with pytest.raises(TypeError, match="q has dtype torch.float64 but x has torch.float32"):
        AF.pose_attentional_pooling(x, q.double(), wb, bb, wt, bt, backend=backend)
    with pytest.raises(TypeError, match="q must be a floating-point"):
        AF.pose_attentional_pooling(x, q.long(), wb, bb, wt, bt, backend=backend)
