"""Deploying models that use attnpool: torch.export (dynamic sizes, save / load), ONNX (both
exporters; ONNX Runtime runs the result), and TorchScript's clear refusal. Every module, on
the CPU kernels; the results are compared with the module's on sizes other than the ones
exported with."""

from __future__ import annotations

import io

import pytest
import torch
from torch.export import Dim

import attnpool
from attnpool import backends, losses

pytestmark = pytest.mark.skipif(backends.extension() is None,
                                reason=f"attnpool._C is not built: {backends.extension_error()}")

B, L, T, HW = Dim("B", min=1, max=64), Dim("L", min=2, max=512), Dim("T", min=3, max=64), \
    Dim("HW", min=3, max=64)  # the mask network's 3x3 convolutions guard H, W >= 3


# ------------------------------------------------------------------ the cases
# name -> (make(), inputs(batch, i) -> args, dynamic_shapes). ``i`` picks the other sizes.
class _Head(torch.nn.Module):
    """A model holding several attnpool modules: clip features -> one score vector."""

    def __init__(self):
        super().__init__()
        self.st = attnpool.SpatioTemporalAttention(8, (6, 4))
        self.cluster = attnpool.AttentionCluster(8, 3)
        self.fc = torch.nn.Linear(8 + 24, 5)

    def forward(self, x):
        pooled = self.st(x)
        frames = x.mean(dim=(-2, -1))
        return self.fc(torch.cat([pooled, self.cluster(frames)], dim=-1))


def _clip(b, i, C=8):
    return (torch.randn(b, 4 + i, C, 5 + i, 5 + i),)


CASES = {
    "attention_cluster": (
        lambda: attnpool.AttentionCluster(16, 4),
        lambda b, i: (torch.randn(b, 7 + 3 * i, 16),),
        ({0: B, 1: L},)),
    "attention_cluster_lengths": (
        lambda: attnpool.AttentionCluster(16, 4, attention="fc2", hidden_features=6),
        lambda b, i: (torch.randn(b, 7 + 3 * i, 16), torch.randint(1, 8 + 3 * i, (b,))),
        ({0: B, 1: L}, {0: B})),
    "multimodal_clusters": (
        lambda: attnpool.MultimodalAttentionClusters({"rgb": (16, 4), "audio": (8, 2)}),
        lambda b, i: ({"rgb": torch.randn(b, 7 + i, 16), "audio": torch.randn(b, 5 + i, 8)},),
        # by name: the ONNX exporter binds a tuple of specs to forward's arguments wrongly
        {"inputs": {"rgb": {0: B, 1: L}, "audio": {0: B, 1: Dim("La", min=2, max=512)}}}),
    "attentional_pooling": (
        lambda: attnpool.AttentionalPooling(8, 5, rank=2),
        lambda b, i: (torch.randn(b, 8, 5 + i, 6 + i),),
        ({0: B, 2: Dim("H", min=2, max=64), 3: Dim("W", min=2, max=64)},)),
    "attentional_pooling_clips": (
        lambda: attnpool.AttentionalPooling(8, 5),
        lambda b, i: (torch.randn(b, 3 + i, 8, 5, 5),),
        ({0: B, 1: T},)),
    "spatiotemporal_attention": (
        lambda: attnpool.SpatioTemporalAttention(8, (6, 4)),
        _clip,
        ({0: B, 1: T, 3: HW, 4: HW},)),
    "spatiotemporal_attention_frames": (  # more frames than H or W: no ordering of sizes
        lambda: attnpool.SpatioTemporalAttention(8, (6, 4)),
        lambda b, i: (torch.randn(b, 4 + 5 * i, 8, 5, 5),),
        ({0: B, 1: T},)),
    "spatiotemporal_regularizer": (
        lambda: losses.SpatioTemporalRegularizer(0.1, 0.2, 0.3),
        lambda b, i: (torch.rand(b, 4 + i, 5, 5), torch.rand(b, 4 + i).softmax(-1)),
        ({0: B, 1: T}, {0: B, 1: T})),
    "pyramid_attention": (
        lambda: attnpool.PyramidAttention([4, 8, 16]),
        lambda b, i: ([torch.randn(b, 4, 16, 16), torch.randn(b, 8, 8, 8),
                       torch.randn(b, 16, 4, 4)],),
        ([{0: B}, {0: B}, {0: B}],)),
    "pyramid_attention_clips": (
        lambda: attnpool.PyramidAttention([4, 8]),
        lambda b, i: ([torch.randn(b, 3 + 2 * i, 4, 8, 8), torch.randn(b, 3 + 2 * i, 8, 4, 4)],),
        ([{0: B, 1: T}, {0: B, 1: T}],)),
    "model_of_several": (_Head, _clip, ({0: B, 1: T, 3: HW, 4: HW},)),
}


def _make(name):
    torch.manual_seed(0)
    return CASES[name][0]().eval()


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


# ------------------------------------------------------------------ torch.export
@pytest.mark.parametrize("name", list(CASES))
def test_export_dynamic_save_load(name):
    make, inputs, dynamic = CASES[name]
    model = _make(name)
    with attnpool.use_backend("cpp"):
        ep = torch.export.export(model, inputs(3, 0), dynamic_shapes=dynamic)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(o.startswith("attnpool.") for o in ops), ops  # the fused op, not a decomposition
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for b, i in ((5, 1), (1, 2)):
        args = inputs(b, i)
        with attnpool.use_backend("reference"), torch.no_grad():  # the plain-PyTorch math
            want = _flat(model(*args))
        for got, w in zip(_flat(loaded(*args)), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ ONNX
def _onnx_inputs(args):
    flat = []
    for a in args:
        if isinstance(a, dict):
            flat += list(a.values())
        elif isinstance(a, (list, tuple)):
            flat += list(a)
        else:
            flat.append(a)
    return [a.numpy() for a in flat]


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_dynamo_export_runs_in_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    make, inputs, dynamic = CASES[name]
    model = _make(name)
    args, kwargs = inputs(3, 0), None
    if isinstance(args[-1], dict):  # torch.onnx.export reads a last dict in args as kwargs
        args, kwargs = (), {"inputs": args[0]}
    with attnpool.use_backend("cpp"):  # an ONNX model holds the reference math, whatever runs
        onnx_program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True,
                                         dynamic_shapes=dynamic)
    path = str(tmp_path / "model.onnx")
    onnx_program.save(path)
    import onnx
    domains = {n.domain for n in onnx.load(path).graph.node}
    assert domains <= {"", "ai.onnx"}, f"only standard ONNX operators, got {domains}"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for b, i in ((5, 1), (2, 2)):  # other batch sizes, and frames / H×W where dynamic
        args = inputs(b, i)
        got = session.run(None, dict(zip(names, _onnx_inputs(args))))
        with torch.no_grad():
            want = _flat(model(*args))
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ TorchScript
@pytest.mark.parametrize("name", ["attention_cluster", "attentional_pooling",
                                  "spatiotemporal_attention", "pyramid_attention",
                                  "spatiotemporal_regularizer"])
def test_jit_script_points_to_torch_export(name):
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.script(_make(name))


# ------------------------------------------------------------------ AOTInductor
def test_aoti_package_runs_in_a_process_that_never_imports_attnpool(tmp_path):
    """An AOTInductor package of a model holding several attnpool modules, compiled from its
    torch.export (dynamic batch and clip length), runs in this process with
    aoti_load_package and in a fresh Python process that only loads attnpool's compiled
    library, on sizes other than the export's. (A Python-free C++ program:
    examples/cpp/deploy.py, run by CI.)"""
    import subprocess
    import sys

    make, inputs, dynamic = CASES["model_of_several"]
    model = _make("model_of_several")
    with attnpool.use_backend("cpp"), torch.no_grad():
        ep = torch.export.export(model, inputs(2, 0), dynamic_shapes=dynamic)
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    args = inputs(5, 1)
    with attnpool.use_backend("reference"), torch.no_grad():  # the plain-PyTorch math
        want = model(*args)
    torch.testing.assert_close(torch._inductor.aoti_load_package(package)(*args), want,
                               rtol=1e-5, atol=1e-5)
    torch.save(list(args), tmp_path / "inputs.pt")
    script = f"""
import sys, torch
torch.ops.load_library({backends.extension().__file__!r})
runner = torch._inductor.aoti_load_package({package!r})
out = runner(*torch.load({str(tmp_path / "inputs.pt")!r}))
assert "attnpool" not in sys.modules
torch.save(out, {str(tmp_path / "out.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_export_and_aoti_package_on_cuda(tmp_path):
    """The same on a GPU with the cuda kernels: the exported program and its AOTInductor
    package give the module's outputs at another batch size and clip length."""
    make, inputs, dynamic = CASES["model_of_several"]
    model = _make("model_of_several").cuda()

    def on_cuda(args):
        return tuple(a.cuda() for a in args)

    with attnpool.use_backend("cuda"), torch.no_grad():
        ep = torch.export.export(model, on_cuda(inputs(2, 0)), dynamic_shapes=dynamic)
    assert "attnpool.attention_cluster.default" in {str(n.target) for n in ep.graph.nodes}
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    args = on_cuda(inputs(5, 1))
    with attnpool.use_backend("cuda"), torch.no_grad():
        want = model(*args)
        torch.testing.assert_close(ep.module()(*args), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch._inductor.aoti_load_package(package)(*args), want,
                               rtol=1e-5, atol=1e-5)
