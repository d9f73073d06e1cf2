"""attnpool.swap: in-place conversion of reference modules (and registered twins) to the
fused modules, and the exact conversion of an avgpool + Linear head."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnpool
from attnpool import reference


class VideoModel(nn.Module):
    """A nested model holding every kind of reference module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.heads = nn.ModuleDict({
            "pool": reference.AttentionalPooling(8, 5, rank=2),
            "st": reference.SpatioTemporalAttention(8, (6, 4)),
            "pyramid": reference.PyramidAttention([3, 8]),
        })
        self.cluster = nn.Sequential(reference.MultimodalAttentionClusters({"rgb": (8, 3)}))

    def forward(self, clip):  # clip [B, T, 3, H, W]
        B, T = clip.shape[:2]
        f = self.stem(clip.flatten(0, 1))
        f = f.reshape(B, T, *f.shape[1:])
        logits = self.heads["pool"](f)
        pooled, mask, w = self.heads["st"](f, return_attention=True)
        frames = f.mean((-2, -1))
        multi = self.cluster[0]({"rgb": frames})
        pyramid, pyramid_loss = self.heads["pyramid"]([clip, f[..., ::2, ::2]], return_loss=True)
        return (logits, pooled, multi, self.heads["st"].regularizer(mask, w), pyramid,
                pyramid_loss)


def randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_swap_nested_model_keeps_everything():
    model = randomise(VideoModel()).double().eval()
    before = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    clip = torch.randn(2, 3, 3, 5, 5, dtype=torch.float64)
    want = before(clip)

    replaced = attnpool.swap(model, backend="auto")
    assert set(replaced) == {"heads.pool", "heads.st", "heads.st.regularizer", "heads.pyramid",
                             "cluster.0", "cluster.0.clusters.rgb"}
    assert replaced["heads.pool"] is reference.AttentionalPooling
    assert isinstance(model.heads["pool"], attnpool.AttentionalPooling)
    assert isinstance(model.heads["st"], attnpool.SpatioTemporalAttention)
    assert isinstance(model.heads["st"].regularizer, attnpool.losses.SpatioTemporalRegularizer)
    assert isinstance(model.cluster[0].clusters["rgb"], attnpool.AttentionCluster)
    # the same parameter objects (an optimizer built before the swap keeps working)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not model.training and all(p.dtype == torch.float64 for p in model.parameters())
    got = model(clip)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # state_dict round trip with the reference twin
    assert model.state_dict().keys() == before.state_dict().keys()
    before.load_state_dict(model.state_dict())


def test_swap_root_module_and_backend():
    m = reference.AttentionCluster(6, 2)
    assert attnpool.swap(m, backend="reference") == {"": reference.AttentionCluster}
    assert isinstance(m, attnpool.AttentionCluster) and m.backend == "reference"
    assert attnpool.swap(m, backend="auto") == {}  # already fused: only the backend changes
    assert m.backend == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        attnpool.swap(m, backend="fast")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        attnpool.swap("model")


def test_swap_gradients_match():
    model = randomise(VideoModel()).double()
    fused = copy.deepcopy(model)
    attnpool.swap(fused)
    clip = torch.randn(2, 3, 3, 4, 4, dtype=torch.float64)
    grads = []
    for m in (model, fused):
        out = m(clip)
        loss = sum(o.square().sum() for o in out)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_register_user_twin():
    class MyPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * x.mean(-1)

    class MyFusedPool(MyPool):
        backend = None

        def forward(self, x):
            return self.scale * x.sum(-1) / x.shape[-1]

    attnpool.swap.register(MyPool, MyFusedPool)
    try:
        model = nn.Sequential(MyPool())
        assert attnpool.swap(model, backend="cpp") == {"0": MyPool}
        assert type(model[0]) is MyFusedPool and model[0].backend == "cpp"
    finally:
        attnpool.swap.TWINS.pop(MyPool)
    with pytest.raises(TypeError, match="must be a subclass"):
        attnpool.swap.register(MyPool, nn.Linear)
