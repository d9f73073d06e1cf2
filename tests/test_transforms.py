"""Every op under PyTorch's tracers and transforms: torch.compile with
changing sizes, torch.jit.trace and the TorchScript-based ONNX exporter, torch.func
(vmap, grad, jacrev, jvp, batched gradcheck), and thread-count independence."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import backends_for
from torch._dynamo.utils import counters

import attnpool
from attnpool import functional as AF
from attnpool import losses

CPU_KERNELS = backends_for("attention_cluster", "cpu", torch.float64)
BACKENDS = ["reference"] + CPU_KERNELS


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


# ------------------------------------------------------------------ the cases
# Each case: (name, make(backend) -> module or function, inputs(i) -> args). ``i`` picks the
# batch and the other varying sizes (frames, H×W, levels' sizes). The first two sets have no
# two equal sizes: torch.compile's duck sizing would tie them together, a recompile that
# is torch's choice and not ours to test.
def _cluster(backend):
    _seed()
    return attnpool.AttentionCluster(6, 3, backend=backend).double()


def _cluster_fc2(backend):
    _seed()
    return attnpool.AttentionCluster(6, 3, attention="fc2", hidden_features=4,
                                     backend=backend).double()


def _cluster_inputs(i):
    B, L = [(2, 5), (3, 7), (5, 4), (4, 6)][i]
    g = torch.Generator().manual_seed(i)
    x = torch.randn(B, L, 6, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    return x, lengths


def _attentional(backend):
    _seed()
    return attnpool.AttentionalPooling(5, 4, rank=2, backend=backend).double()


def _attentional_pose(backend):
    _seed()
    return attnpool.AttentionalPooling(5, 4, pose_keypoints=3, pose_channels=4,
                                       backend=backend).double()


def _image_inputs(i):
    B, H, W = [(2, 3, 4), (3, 4, 6), (5, 4, 4), (4, 2, 3)][i]
    return (torch.randn(B, 5, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(i)),)


def _clip_inputs(i):
    B, T, H, W = [(2, 3, 4, 6), (3, 4, 6, 2), (5, 2, 4, 4), (4, 3, 2, 3)][i]
    return (torch.randn(B, T, 5, H, W, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(i)),)


def _spatiotemporal(backend):
    _seed()
    return attnpool.SpatioTemporalAttention(5, mask_hidden=(4, 3), backend=backend).double().eval()


def _pyramid(backend):
    _seed()
    return attnpool.PyramidAttention([3, 7], backend=backend).double()


def _pyramid_inputs(i):
    B, H = [(2, 4), (3, 6), (5, 3), (4, 5)][i]
    g = torch.Generator().manual_seed(i)
    return ([torch.randn(B, 3, 2 * H, 2 * H, generator=g, dtype=torch.float64),
             torch.randn(B, 7, H, H, generator=g, dtype=torch.float64)],)


def _regularizer(backend):
    return losses.SpatioTemporalRegularizer(backend=backend)


def _mask_w_inputs(i):
    B, T, H, W = [(2, 5, 3, 4), (3, 6, 4, 2), (5, 4, 3, 3), (4, 7, 2, 3)][i]
    g = torch.Generator().manual_seed(i)
    return (torch.rand(B, T, H, W, generator=g, dtype=torch.float64),
            torch.softmax(torch.randn(B, T, generator=g, dtype=torch.float64), 1))


def _tv(backend):
    return lambda mask, w: losses.total_variation(mask, backend=backend)


def _contrast(backend):
    return lambda mask, w: losses.mask_contrast(mask, backend=backend)


def _unimodality(backend):
    return lambda mask, w: losses.unimodality(w, backend=backend)


def _pool(backend):
    def f(x):
        mask = torch.sigmoid(x.mean(2))
        return AF.temporal_attention_pool(x, mask, x.mean((2, 3, 4)), backend=backend)
    return f


def _frame_means(backend):
    return lambda x: AF.masked_frame_means(x, torch.sigmoid(x.mean(2)), backend=backend)


CASES = {
    "AttentionCluster": (_cluster, _cluster_inputs),
    "AttentionCluster-fc2": (_cluster_fc2, _cluster_inputs),
    "AttentionalPooling": (_attentional, _image_inputs),
    "AttentionalPooling-clip": (_attentional, _clip_inputs),
    "AttentionalPooling-pose": (_attentional_pose, _image_inputs),
    "SpatioTemporalAttention": (_spatiotemporal, _clip_inputs),
    "PyramidAttention": (_pyramid, _pyramid_inputs),
    "SpatioTemporalRegularizer": (_regularizer, _mask_w_inputs),
    "total_variation": (_tv, _mask_w_inputs),
    "mask_contrast": (_contrast, _mask_w_inputs),
    "unimodality": (_unimodality, _mask_w_inputs),
    "temporal_attention_pool": (_pool, _clip_inputs),
    "masked_frame_means": (_frame_means, _clip_inputs),
}


def _flat(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("name", list(CASES))
def test_compile_fullgraph_changing_sizes(name, dynamic):
    """fullgraph=True over four sizes (batch and the other sizes change together): no graph
    break, at most one recompile (automatic dynamic shapes) by default and none with
    dynamic=True, and the eager results."""
    make, inputs = CASES[name]
    fn = make("auto")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for i in range(4):
        args = inputs(i)
        for got, want in zip(_flat(compiled(*args)), _flat(fn(*args)), strict=True):
            torch.testing.assert_close(got, want)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= (1 if dynamic else 2), f"{graphs} graphs for 4 sizes"


@pytest.mark.skipif("triton" not in CPU_KERNELS, reason="no Triton interpreter here")
def test_compile_triton_first_call_of_a_process(tmp_path):
    """torch.compile(fullgraph=True) as the first attnpool call of a process, on the Triton
    backend: the kernels' import must not happen inside the traced code. (Run outside the
    checkout, so that the installed attnpool is the one imported.)"""
    code = ("import torch, attnpool\n"
            "m = attnpool.AttentionCluster(6, 3, backend='triton')\n"
            "x = torch.randn(2, 5, 6)\n"
            "out = torch.compile(m, fullgraph=True, backend='aot_eager')(x)\n"
            "torch.testing.assert_close(out, m(x))\n"
            "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------ tracers
@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_jit_trace_records_the_op(backend):
    """torch.jit.trace records the op itself, never its result as a constant: the traced
    module gives the right answer on another input."""
    m = _cluster(backend)
    x, lengths = _cluster_inputs(0)
    traced = torch.jit.trace(m, (x, lengths), check_trace=False)
    assert "attnpool::attention_cluster" in str(traced.graph)
    x2, lengths2 = _cluster_inputs(1)
    torch.testing.assert_close(traced(x2, lengths2), m(x2, lengths2))


@pytest.mark.parametrize("backend", [None] + CPU_KERNELS)
def test_legacy_onnx_export_exports_the_reference(backend, tmp_path):
    """The TorchScript-based exporter (dynamo=False) exports the reference math whatever the
    backend (an ONNX model holds no attnpool kernel): the graph has the model's input and
    computes from it (no constant stands for the output); ONNX's own reference evaluator
    runs it to the module's output on another input. (dynamo=True: tests/test_deploy.py.)"""
    import onnx
    from onnx.reference import ReferenceEvaluator

    m = _cluster(backend).float()
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(m, (torch.randn(2, 5, 6),), path, dynamo=False, input_names=["x"])
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["x"]
    assert not any(n.domain for n in model.graph.node), "only standard ONNX operators"
    x = torch.randn(2, 5, 6)
    (got,) = ReferenceEvaluator(model).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), m(x).detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ torch.func
def _cluster_fn(backend):
    m = _cluster(backend)
    params = dict(m.named_parameters())

    def f(x, weight):
        return torch.func.functional_call(m, {**params, "weight": weight}, (x,))
    return f, params["weight"].detach()


OPS = ["attention_cluster", "attentional_pooling", "st_regularizer", "masked_frame_means",
       "pyramid_attention"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_vmap_over_inputs_and_parameters(backend, op):
    """vmap over both arguments (inputs and parameters alike) and over one of them."""
    fn, a, b = _per_op_functions(backend)[op]
    As = torch.stack([a + 0.1 * k for k in range(3)])
    Bs = torch.stack([b * (1 + 0.2 * k) for k in range(3)])
    torch.testing.assert_close(torch.func.vmap(fn)(As, Bs),
                               torch.stack([fn(As[k], Bs[k]) for k in range(3)]))
    torch.testing.assert_close(torch.func.vmap(fn, in_dims=(0, None))(As, b),
                               torch.stack([fn(As[k], b) for k in range(3)]))


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_grad_and_jacrev_match_the_reference(backend, op):
    fn, a, b = _per_op_functions(backend)[op]
    ref, _, _ = _per_op_functions("reference")[op]
    loss = lambda f: lambda a, b: f(a, b).pow(2).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(fn), argnums=(0, 1))(a, b),
                               torch.func.grad(loss(ref), argnums=(0, 1))(a, b))
    torch.testing.assert_close(torch.func.jacrev(fn, argnums=1)(a, b),
                               torch.func.jacrev(ref, argnums=1)(a, b))


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_forward_mode_ad_raises_clearly(backend):
    f, weight = _cluster_fn(backend)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="forward-mode"):
        torch.func.jvp(lambda x: f(x, weight), (x,), (torch.ones_like(x),))


def _per_op_functions(backend):
    """One float64 function of two tensors per op, for batched gradcheck."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w_c, a_c, b_c = r(2, 4), r(2), r(2)
    wb_p, wt_p = r(1, 3), r(1, 2, 3)
    pyr_w = [r(2), r(3)]
    return {
        "attention_cluster": (
            lambda x, w: AF.attention_cluster(x, w, None, a_c, b_c, backend=backend)[0],
            r(2, 3, 4), w_c),
        "attentional_pooling": (
            lambda x, wt: AF.attentional_pooling(x, wb_p, None, wt, None, backend=backend)[0],
            r(2, 3, 2, 2), wt_p),
        "st_regularizer": (
            lambda m, w: AF.st_regularizer(torch.sigmoid(m), torch.softmax(w, 1), 0.5, 0.3, 1.0,
                                           sqrt=False, backend=backend),
            r(2, 4, 2, 2), r(2, 4)),
        "masked_frame_means": (
            lambda x, m: AF.masked_frame_means(x, torch.sigmoid(m), backend=backend),
            r(2, 2, 3, 2, 2), r(2, 2, 2, 2)),
        "pyramid_attention": (
            lambda x0, x1: AF.pyramid_attention([x0, x1], pyr_w, torch.zeros(2, dtype=torch.float64),
                                                backend=backend)[0],
            r(2, 2, 4, 4), r(2, 3, 2, 2)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["attention_cluster", "attentional_pooling", "st_regularizer",
                                "masked_frame_means", "pyramid_attention"])
def test_batched_gradcheck(backend, op):
    fn, a, b = _per_op_functions(backend)[op]
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(fn, (a, b), check_batched_grad=True, fast_mode=True)


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("name", ["AttentionCluster", "AttentionalPooling",
                                  "AttentionalPooling-pose", "SpatioTemporalRegularizer",
                                  "PyramidAttention", "masked_frame_means"])
def test_results_do_not_depend_on_thread_count(name, backend):
    """Outputs and gradients are bitwise the same with 1, 2 and 3 intra-op threads, for small
    batches (where the kernels split samples across threads) and larger ones."""
    make, inputs = CASES[name]
    # 100 frames: the cpp cluster's d-attention gemm (64 valid frames or more), and at B=1
    # the backward's frames split over the threads
    clips = [(torch.randn(1, 100, 6, dtype=torch.float64), torch.tensor([100])),
             (torch.randn(6, 100, 6, dtype=torch.float64), torch.tensor([100, 64, 63, 70, 1, 90]))]
    big = {"AttentionalPooling": [(torch.randn(1, 5, 14, 14, dtype=torch.float64),)],
           "AttentionalPooling-pose": [(torch.randn(1, 5, 14, 14, dtype=torch.float64),)],
           "AttentionCluster": clips}
    cases = [inputs(0), inputs(2)] + big.get(name, [])
    fn = make(backend)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            run = []
            for args in cases:
                args = [[a.clone().requires_grad_() for a in t] if isinstance(t, list)
                        else t.clone().requires_grad_() if t.is_floating_point() else t
                        for t in args]
                outs = _flat(fn(*args))
                leaves = [a for t in args for a in (t if isinstance(t, list) else [t])
                          if a.requires_grad]
                params = [p for p in getattr(fn, "parameters", lambda: [])()]
                grads = torch.autograd.grad(sum(o.float().sum() * (k + 1) for k, o in
                                                enumerate(outs) if o.requires_grad),
                                            leaves + params, allow_unused=True)
                run += [o.detach() for o in outs] + [g for g in grads if g is not None]
            results.append(run)
    finally:
        torch.set_num_threads(threads)
    for n, run in zip((2, 3), results[1:]):
        for a, b in zip(results[0], run, strict=True):
            assert torch.equal(a, b), f"{n} threads differ from 1"
