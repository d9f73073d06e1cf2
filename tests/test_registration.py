"""How the ops are registered: the compiled kernels in C++ (csrc/<name>.cpp), so that loading
attnpool's compiled library, without importing attnpool, is enough to run them; the Triton
kernels as the ``_triton`` twins from Python; and a compiled op called with another backend's
name fails with a clear error instead of running something else."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attnpool
from attnpool import backends, reference

pytestmark = pytest.mark.skipif(backends.extension() is None,
                                reason=f"attnpool._C is not built: {backends.extension_error()}")

COMPILED_OPS = ["attention_cluster", "attention_cluster_backward",
                "attention_cluster_fc1_backward", "attentional_pooling",
                "attentional_pooling_backward", "weighted_pool", "weighted_pool_backward",
                "st_regularizer", "st_regularizer_backward", "pyramid_attention",
                "pyramid_attention_backward"]


def test_every_op_is_registered_in_cpp_with_cpu_kernels():
    for name in COMPILED_OPS:
        op = getattr(torch.ops.attnpool, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name


def test_library_alone_runs_the_cpp_ops(tmp_path):
    """A process that never imports attnpool loads attnpool._C with torch.ops.load_library
    and runs every forward op; its results equal the reference's."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, weight, alpha, beta = randn(3, 5, 8), randn(4, 8), randn(4).exp(), randn(4)
    lengths = torch.tensor([5, 2, 3])
    xp, wb, bb = randn(2, 6, 10), randn(2, 6), randn(2)
    mask, w = randn(2, 4, 3, 3).sigmoid(), randn(2, 4).sigmoid()
    maps, score_weights, score_bias = [randn(2, 3, 8, 8), randn(2, 5, 4, 4)], [randn(3), randn(5)], randn(2)
    inputs = dict(x=x, weight=weight, alpha=alpha, beta=beta, lengths=lengths, xp=xp, wb=wb,
                  bb=bb, mask=mask, w=w, maps=maps, score_weights=score_weights,
                  score_bias=score_bias)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
import sys, torch
torch.ops.load_library({backends.extension().__file__!r})
assert "attnpool" not in sys.modules
i = torch.load({str(tmp_path / "inputs.pt")!r})
ops = torch.ops.attnpool
out = dict(
    cluster=ops.attention_cluster(i["x"], None, i["weight"], None, i["lengths"], i["alpha"],
                                  i["beta"], True, 1e-12, 0.0, "cpp")[0],
    pooling=ops.attentional_pooling(i["xp"], i["wb"], i["bb"], "cpp")[0],
    weighted=ops.weighted_pool(i["xp"], i["xp"][:, :2], "cpp"),
    regularizer=ops.st_regularizer(i["mask"], i["w"], 1.0, 0.5, 0.25, False, True, True, "cpp"),
    pyramid=ops.pyramid_attention([m.unsqueeze(1) for m in i["maps"]], i["score_weights"],
                                  i["score_bias"], 1e-12, 0.7, "cpp")[:2],
)
torch.save(out, {str(tmp_path / "out.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    out = torch.load(tmp_path / "out.pt")
    expected, _ = reference.attention_cluster_op(x, x @ weight.T, lengths, alpha, beta, True,
                                                 1e-12, "clamp")
    torch.testing.assert_close(out["cluster"], expected, rtol=1e-12, atol=1e-12)
    z, _ = reference.attentional_pooling_op(xp, wb, bb)
    torch.testing.assert_close(out["pooling"], z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["weighted"], reference.weighted_pool(xp, xp[:, :2]),
                               rtol=1e-12, atol=1e-12)
    expected = reference.st_regularizer(mask, w, 1.0, 0.5, 0.25, sqrt=False, tv_reduction="mean",
                                        unimodal_reduction="mean")
    torch.testing.assert_close(out["regularizer"], expected, rtol=1e-12, atol=1e-12)
    expected = reference.pyramid_attention(maps, score_weights, score_bias, 1e-12, 0.7)
    torch.testing.assert_close(tuple(out["pyramid"]), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compiled_op_rejects_another_backend(backend):
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"cpp kernels were called with backend '{backend}'"):
        torch.ops.attnpool.weighted_pool(x, x[:, :1], backend)


def test_triton_twins_are_registered_from_python():
    why = attnpool.available("weighted_pool", torch.device("cpu"), torch.float64)["triton"]
    if why is not None:
        pytest.skip(why)
    for name in ("attention_cluster", "attentional_pooling", "weighted_pool", "st_regularizer",
                 "pyramid_attention"):
        assert hasattr(torch.ops.attnpool, f"{name}_triton"), name
        assert hasattr(torch.ops.attnpool, f"{name}_backward_triton"), name
