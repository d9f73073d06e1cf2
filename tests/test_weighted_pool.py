"""The weighted spatial pool (op weighted_pool) through its users: the masked frame means and
the temporal attention pool of spatio-temporal attention, against the float64 reference
(docs/design.md). Its use by the pose variant of attentional pooling is tested in
tests/test_attentional_pooling.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backends_for, rounded_to, torch_ops
from hypothesis import given
from hypothesis import strategies as st
from op_suite import OpSuite

from attnpool import functional as AF
from attnpool import reference

POOL_BACKENDS = backends_for("weighted_pool", "cpu", torch.float64)


def make_mask(B, T, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, H, W, generator=g, dtype=torch.float64)


class TestWeightedPoolSuite(OpSuite):
    """The shared suite (tests/op_suite.py) on the masked frame means."""

    op = "weighted_pool"

    def inputs(self, B, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(B, 3, 5, 2, 4, generator=g, dtype=torch.float64)
        return [x, make_mask(B, 3, 2, 4, seed + 1)]

    def call(self, backend, x, mask):
        return (AF.masked_frame_means(x, mask, backend=backend),)


# ------------------------------------------------------------------ pooling
def make_clip(B, T, C, H, W, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, H, W, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    mask = make_mask(B, T, H, W, seed + 1)
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


@pytest.mark.parametrize("backend,shape", [(b, (2, 3, 40, 7, 7)) for b in POOL_BACKENDS] +
                         [(b, (1, 2, 86016, 7, 7)) for b in POOL_BACKENDS if b != "triton"])
def test_pool_float32_7x7(backend, shape):
    """fp32 7x7 maps, C >= 16: the AVX-512 grad_x kernel of cpp, with streaming stores into a
    grad_x under 32 MiB and plain ones into a larger one (33.7 MB; csrc kStreamBelow). The
    large one is cpp only (42 s under the Triton interpreter)."""
    case = make_clip(*shape, seed=8)
    ref = pool_run(case, "reference", torch.float64)
    ref_lowp = pool_run(case, "reference", torch.float32)
    got = pool_run(case, backend, torch.float32)
    for name in ref:
        assert_close(got[name], ref[name], f"{backend}/{name}", ref_lowp[name])


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
    torch.library.opcheck(torch_ops(backend).weighted_pool.default, (x, h, backend))
    grad_z = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch_ops(backend).weighted_pool_backward.default,
                          (grad_z, x.detach(), h.detach(), backend))


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


@pytest.mark.parametrize("backend", ["reference"] + POOL_BACKENDS)
def test_empty_batch(backend):
    x, mask, scores, _, _ = make_clip(0, 3, 4, 2, 3, seed=10)
    x.requires_grad_()
    pooled, w = AF.temporal_attention_pool(x, mask, scores, backend=backend)
    assert pooled.shape == (0, 4) and w.shape == (0, 3)
    pooled.sum().backward()
    assert x.grad.shape == x.shape


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
