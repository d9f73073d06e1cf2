"""Official checkpoints: each official module's computation rebuilt here, in plain PyTorch /
numpy from the official code (its parameter names and layouts), fed random official weights,
against attnpool's module converted with ``from_official``, in float64: outputs and gradients
within 1e-12 relative, on the reference and every CPU kernel backend.

Official codes read (not copied): longxiang92/Flash-MNIST ``main_feature_satt.py``;
PaddlePaddle/models ``PaddleCV/video/models/attention_cluster/{shifting_attention,
attention_cluster}.py`` and Paddle's ``norm_op.h`` (``l2_normalize``); mindspore-ai/models
``research/cv/AttentionCluster/src/models/attention_cluster.py``;
rohitgirdhar/AttentionalPoolingAction ``models/slim/nets/nets_factory.py``, ``src/loss.py``;
LiliMeng/spatial_temporal_att_thumos14 ``spatial_temporal_attention/thumos14_spa_temp_att.py``
with its ConvLSTM (ndrplz/ConvLSTM_pytorch, 2017 version: the constructor it calls).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import backends_for

import attnpool
from attnpool import reference

F64 = torch.float64
TOL = 1e-12


def close(got, want, name, scale=0.0):
    """‖got − want‖∞ ≤ 1e-12·max(‖want‖∞, scale); NaN exactly where want has NaN."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern differs"
    ok = ~torch.isnan(want)
    if not ok.any():
        return
    err = (got[ok] - want[ok]).abs().max().item()
    bound = TOL * max(want[ok].abs().max().item(), scale, 1e-300)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def modules(factory):
    """The converted module on the reference and on every fused CPU backend."""
    out = [("reference", factory(reference))]
    for backend in ["reference"] + backends_for("attention_cluster", "cpu", F64):
        out.append((backend, factory(attnpool, backend=backend)))
    return out


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


# ================================================================== attention clusters
def flash_mnist(sd, x):
    """ShiftingAttention.forward (longxiang92/Flash-MNIST): Conv1d scores, softmax over frames,
    per unit o = Σ_l a_l x_l · w_i + b_i, o / ‖o‖ / sqrt(N) (no eps)."""
    N = sd["w"].shape[0]
    scores = F.conv1d(x.transpose(1, 2), sd["attentions.weight"], sd["attentions.bias"])
    weights = torch.softmax(scores.reshape(-1, scores.shape[-1]), dim=1).reshape(scores.shape)
    outs = []
    for i in range(N):
        o = torch.sum(x * weights[:, i, :, None], 1) * sd["w"][i] + sd["b"][i]
        outs.append(o / torch.norm(o, 2, -1, keepdim=True) / np.sqrt(N))
    return torch.cat(outs, -1)


def paddle(sd, x, prefix=""):
    """ShiftingAttentionModel.forward (PaddleCV video): conv2d of [B, F, L, 1], softmax over the
    seg_num frames, shift = Σ_l a_l x_l · shift_w + shift_b, l2_normalize (x / sqrt(Σx² + 1e-12),
    Paddle's norm op) / sqrt(N)."""
    w, b = sd[prefix + "conv.weight"], sd[prefix + "conv.bias"]
    N, L = w.shape[0], x.shape[1]
    scores = F.conv2d(x.transpose(1, 2)[..., None], w, b)[..., 0]          # [B, N, L]
    weights = torch.softmax(scores.reshape(-1, L), dim=1).reshape(scores.shape)
    outs = []
    for i in range(N):
        shift = (x * weights[:, i, :, None]).sum(1) * sd[prefix + "shift_w"][i] \
            + sd[prefix + "shift_b"][i]
        norm = torch.sqrt((shift * shift).sum(-1, keepdim=True) + 1e-12)
        outs.append(shift / norm / np.sqrt(N))
    return torch.cat(outs, 1)


def mindspore(sd, x):
    """ShiftingAttention.construct (MindSpore port): seq = Conv1d (fc1) or Conv1d, Tanh, Conv1d
    (fc2), kernels [out, in, 1, 1] as MindSpore 1.x stores them; o / nn.Norm(o) / sqrt(N)."""
    def conv1d(t, name):
        return F.conv1d(t, sd[name + ".weight"].flatten(2), sd[name + ".bias"])
    scores = conv1d(x.transpose(1, 2), "seq.0")
    if "seq.2.weight" in sd:
        scores = conv1d(torch.tanh(scores), "seq.2")
    N = scores.shape[1]
    weights = torch.softmax(scores.reshape(-1, scores.shape[-1]), dim=-1).reshape(scores.shape)
    outs = []
    for i in range(N):
        o = (x * weights[:, i, :, None]).sum(1) * sd["w"][i] + sd["b"][i]
        outs.append(o / torch.sqrt((o * o).sum(-1, keepdim=True)) / np.sqrt(N))
    return torch.cat(outs, -1)


def cluster_checkpoint(source, F_, N, g, hidden=5):
    if source == "flash-mnist":
        return {"attentions.weight": randn(g, N, F_, 1), "attentions.bias": randn(g, N),
                "w": randn(g, N), "b": randn(g, N)}
    if source == "paddle":
        return {"conv.weight": randn(g, N, F_, 1, 1), "conv.bias": randn(g, N),
                "shift_w": randn(g, N), "shift_b": randn(g, N)}
    if source == "mindspore-fc2":
        return {"seq.0.weight": randn(g, hidden, F_, 1, 1), "seq.0.bias": randn(g, hidden),
                "seq.2.weight": randn(g, N, hidden, 1, 1), "seq.2.bias": randn(g, N),
                "w": randn(g, N), "b": randn(g, N)}
    return {"seq.0.weight": randn(g, N, F_, 1, 1), "seq.0.bias": randn(g, N),
            "w": randn(g, N), "b": randn(g, N)}


OFFICIAL_CLUSTER = {"flash-mnist": flash_mnist, "paddle": paddle, "mindspore-fc1": mindspore,
                    "mindspore-fc2": mindspore}
# (official key, our parameter, how the official one maps onto ours)
PARAM_MAP = {
    "flash-mnist": [("attentions.weight", "weight"), ("w", "alpha"), ("b", "beta")],
    "paddle": [("conv.weight", "weight"), ("shift_w", "alpha"), ("shift_b", "beta")],
    "mindspore-fc1": [("seq.0.weight", "weight"), ("w", "alpha"), ("b", "beta")],
    "mindspore-fc2": [("seq.0.weight", "weight1"), ("seq.0.bias", "bias1"),
                      ("seq.2.weight", "weight"), ("w", "alpha"), ("b", "beta")],
}


def compare_cluster(source, sd, x, lengths=None):
    """Ours (every backend) against the official computation, applied per sample to its valid
    frames when there are lengths (the official codes take fixed-length clips)."""
    official = OFFICIAL_CLUSTER[source]
    osd = {k: v.clone().requires_grad_() for k, v in sd.items()}
    xo = x.clone().requires_grad_()
    if lengths is None:
        want = official(osd, xo)
    else:
        want = torch.cat([official(osd, xo[b:b + 1, :n]) for b, n in enumerate(lengths.tolist())])
    g_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    if torch.isnan(want).any():  # flash-mnist with a zero vector: the forward only
        wgrads = None
    else:
        wgrads = torch.autograd.grad(want, [xo, *osd.values()], g_out)
    name = source.split("-")[0] if source.startswith("mindspore") else source
    for backend, mod in modules(lambda ns, **kw: ns.AttentionCluster.from_official(sd, name, **kw)):
        xm = x.clone().requires_grad_()
        got = mod(xm, lengths)
        close(got, want, f"{source} {backend} out")
        if wgrads is None:
            continue
        params = dict(mod.named_parameters())
        grads = torch.autograd.grad(got, [xm, *params.values()], g_out)
        ours = dict(zip(params, grads[1:]))
        official_grads = dict(zip(osd, wgrads[1:]))
        close(grads[0], wgrads[0], f"{source} {backend} grad x")
        for key, ours_name in PARAM_MAP[source]:
            want_g = official_grads[key].reshape(ours[ours_name].shape)
            close(ours[ours_name], want_g, f"{source} {backend} grad {key}")
        # the softmax cancels the scoring bias: the official gradient is rounding noise
        bias_key = {"flash-mnist": "attentions.bias", "paddle": "conv.bias"}.get(
            source, "seq.2.bias" if source == "mindspore-fc2" else "seq.0.bias")
        close(ours["bias"], official_grads[bias_key], f"{source} {backend} grad {bias_key}",
              scale=official_grads[PARAM_MAP[source][0][0]].abs().max().item())
    return want


@pytest.mark.parametrize("source", list(OFFICIAL_CLUSTER))
@pytest.mark.parametrize("B,L,F_,N", [(3, 7, 10, 4), (2, 1, 6, 3)], ids=["L7", "one-frame"])
def test_cluster_from_official(source, B, L, F_, N):
    g = torch.Generator().manual_seed(1)
    compare_cluster(source, cluster_checkpoint(source, F_, N, g), randn(g, B, L, F_))


@pytest.mark.parametrize("source", list(OFFICIAL_CLUSTER))
def test_cluster_from_official_lengths(source):
    g = torch.Generator().manual_seed(2)
    x = randn(g, 3, 6, 5)
    x[1, 4:] = float("nan")  # padding: whatever it holds
    compare_cluster(source, cluster_checkpoint(source, 5, 3, g), x, torch.tensor([6, 4, 1]))


def test_cluster_zero_shifted_vector():
    """Unit 0's shifted vector is exactly 0 (w = b = 0). PaddlePaddle: output 0 and gradient
    g / sqrt(1e-12) (eps inside the root; a clamp at 1e-12 would give g / 1e-12). Flash-MNIST:
    no eps, 0 / 0 = NaN in that unit's output, as the official module gives."""
    g = torch.Generator().manual_seed(3)
    sd = cluster_checkpoint("paddle", 6, 3, g)
    sd["shift_w"][0] = sd["shift_b"][0] = 0
    want = compare_cluster("paddle", sd, randn(g, 2, 4, 6))
    assert torch.equal(want[:, :6], torch.zeros(2, 6, dtype=F64))
    sd = cluster_checkpoint("flash-mnist", 6, 3, g)
    sd["w"][0] = sd["b"][0] = 0
    want = compare_cluster("flash-mnist", sd, randn(g, 2, 4, 6))
    assert torch.isnan(want[:, :6]).all() and not torch.isnan(want[:, 6:]).any()


def test_cluster_eps_placement_differs_near_zero():
    """The placements differ where ‖u‖ is near sqrt(eps), so the option is needed: a
    clamp-form conversion of a PaddlePaddle checkpoint would not match there."""
    g = torch.Generator().manual_seed(4)
    sd = cluster_checkpoint("paddle", 4, 2, g)
    sd["shift_w"][0], sd["shift_b"][0] = 0, 1e-7
    x = randn(g, 1, 3, 4)
    want = paddle(sd, x)
    converted = reference.AttentionCluster.from_official(sd, "paddle")
    close(converted(x), want, "sqrt placement")
    clamp = reference.AttentionCluster.from_official(sd, "paddle", eps_placement="clamp")
    assert (clamp(x) - want).abs().max() > 0.1


def paddle_multimodal(sd, feats, names):
    return torch.cat([paddle(sd, feats[n], f"satt{i}.") for i, n in enumerate(names)], 1)


def test_multimodal_from_official_paddle():
    g = torch.Generator().manual_seed(5)
    dims = {"rgb": (7, 4), "audio": (3, 2)}
    sd = {}
    for i, (f, n) in enumerate(dims.values()):
        sd.update({f"satt{i}.{k}": v for k, v in cluster_checkpoint("paddle", f, n, g).items()})
    sd.update({"fc1.weights": randn(g, 34, 8), "fc1.bias": randn(g, 8)})  # the classifier
    feats = {n: randn(g, 2, 5, f) for n, (f, _) in dims.items()}
    osd = {k: v.clone().requires_grad_() for k, v in sd.items()}
    ofeats = {k: v.clone().requires_grad_() for k, v in feats.items()}
    want = paddle_multimodal(osd, ofeats, list(dims))
    g_out = randn(g, *want.shape)
    wgrads = torch.autograd.grad(want, list(ofeats.values()) + [osd["satt1.shift_b"]], g_out)
    for backend, mod in modules(lambda ns, **kw: ns.MultimodalAttentionClusters.from_official(
            sd, "paddle", modalities=("rgb", "audio"), **kw)):
        assert mod.clusters["audio"].eps_placement == "sqrt"
        mfeats = {k: v.clone().requires_grad_() for k, v in feats.items()}
        got = mod(mfeats)
        close(got, want, f"multimodal {backend} out")
        grads = torch.autograd.grad(got, list(mfeats.values()) + [mod.clusters["audio"].beta],
                                    g_out)
        for name, a, b in zip(("rgb", "audio", "satt1.shift_b"), grads, wgrads):
            close(a, b, f"multimodal {backend} grad {name}")


def test_cluster_from_official_bad_input():
    g = torch.Generator().manual_seed(6)
    sd = cluster_checkpoint("flash-mnist", 5, 3, g)
    with pytest.raises(ValueError, match="source must be one of"):
        attnpool.AttentionCluster.from_official(sd, "caffe")
    with pytest.raises(ValueError, match=r"missing 'w' \(shape \[N=3\]\)"):
        attnpool.AttentionCluster.from_official({k: v for k, v in sd.items() if k != "w"},
                                                "flash-mnist")
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        attnpool.AttentionCluster.from_official({**sd, "extra": sd["w"]}, "flash-mnist")
    with pytest.raises(ValueError, match=r"'attentions.weight' must have shape \[N, F, 1\], got \[3, 5\]"):
        attnpool.AttentionCluster.from_official({**sd, "attentions.weight": randn(g, 3, 5)},
                                                "flash-mnist")
    with pytest.raises(ValueError, match=r"'b' must have shape \[N=3\], got \[4\]"):
        attnpool.AttentionCluster.from_official({**sd, "b": randn(g, 4)}, "flash-mnist")
    with pytest.raises(TypeError, match="'w' must be a tensor or numpy array"):
        attnpool.AttentionCluster.from_official({**sd, "w": [1.0, 2.0, 3.0]}, "flash-mnist")
    with pytest.raises(TypeError, match="mapping"):
        attnpool.AttentionCluster.from_official(list(sd.values()), "flash-mnist")
    with pytest.raises(ValueError, match=r"'satt0.conv.weight' must have shape \[N, F, 1, 1\]"):
        attnpool.AttentionCluster.from_official(
            {f"satt0.{k}": v for k, v in cluster_checkpoint("mindspore-fc1", 5, 3, g).items()
             if k.startswith("seq.0")} | {"satt0.conv.weight": randn(g, 3, 5, 1)}, "paddle",
            prefix="satt0.")
    psd = {f"satt{i}.{k}": v for i in range(2)
           for k, v in cluster_checkpoint("paddle", 5, 3, g).items()}
    with pytest.raises(ValueError, match=r"holds clusters \['satt0', 'satt1'\], but modalities"):
        attnpool.MultimodalAttentionClusters.from_official(psd, modalities=("rgb",))
    with pytest.raises(ValueError, match="source must be 'paddle'"):
        attnpool.MultimodalAttentionClusters.from_official(psd, "mindspore")
    with pytest.raises(ValueError, match="eps_placement must be"):
        attnpool.AttentionCluster(5, 3, eps_placement="inside")


def test_cluster_from_official_numpy_and_dtype():
    """numpy values (PaddlePaddle's load_program_state, MindSpore's asnumpy()) in float32 give a
    float32 module unless dtype is given."""
    g = torch.Generator().manual_seed(7)
    sd = {f"att.0.{k}": v.float().numpy() for k, v in cluster_checkpoint("mindspore-fc1", 5, 3, g).items()}
    sd["att.0.seq.0.weight"] = sd["att.0.seq.0.weight"][..., 0]  # [N, F, 1] also accepted
    mod = attnpool.AttentionCluster.from_official(sd, "mindspore", prefix="att.0.")
    assert mod.weight.dtype == torch.float32 and mod.eps == 0.0
    mod64 = reference.AttentionCluster.from_official(sd, "mindspore", prefix="att.0.", dtype=F64)
    assert mod64.alpha.dtype == F64
    assert torch.equal(mod64.weight, torch.from_numpy(sd["att.0.seq.0.weight"][..., 0]).double())


# ================================================================== attentional pooling
def tf_variables(g, C, K, rank, pose=False, D=6, J=4, scope=""):
    """Random variables of Girdhar's head, TF layouts ([1, 1, in, out] kernels), numpy."""
    att = scope + "PosePrelogitsBasedAttention/"
    v = {att + "Conv2d_PrePose_Attn/weights": randn(g, 1, 1, D if pose else C, 1),
         att + "Conv2d_PrePose_Attn/biases": randn(g, 1)}
    for p in range(1, rank):
        v[att + f"Conv2d_PrePose_Attn{p}/weights"] = randn(g, 1, 1, 1, 1)
        v[att + f"Conv2d_PrePose_Attn{p}/biases"] = randn(g, 1)
    for p in range(rank):
        name = "Conv" if p == 0 else f"Conv_{p}"
        v[att + f"{name}/weights"] = randn(g, 1, 1, C, K)
        v[att + f"{name}/biases"] = randn(g, K)
    head = scope + "PoseLogits/"  # always in the graph (unused by the plain attention model)
    v[head + "ExtraConv2d_1x1/weights"] = randn(g, 1, 1, C, D)
    v[head + "ExtraConv2d_1x1/biases"] = randn(g, D)
    v[head + "Conv2d_1c_1x1/weights"] = randn(g, 1, 1, D, J)
    v[head + "Conv2d_1c_1x1/biases"] = randn(g, J)
    return {k: t.numpy() for k, t in v.items()}


def girdhar_graph(v, last_conv, rank, pose, keep=None, scope=""):
    """nets_factory.py's PosePrelogitsBasedAttention on last_conv [B, H, W, C] (NHWC), in torch
    from the numpy variables: the bottom-up maps chained through the rank convs, the top-down
    convs on the dropped-out last_conv (keep: its mask / keep_prob), mean over positions,
    sum over ranks. Returns (logits, pose_logits or None, variables as tensors)."""
    t = {k: torch.tensor(a, requires_grad=True) for k, a in v.items()}

    def conv(inp, name):  # slim.conv2d 1x1, no normalizer, no activation
        return inp @ t[scope + name + "/weights"][0, 0] + t[scope + name + "/biases"]

    pose_logits = None
    net = last_conv
    if pose:
        net = torch.relu(conv(last_conv, "PoseLogits/ExtraConv2d_1x1"))   # pose_pre_logits
        pose_logits = conv(net, "PoseLogits/Conv2d_1c_1x1")
    att = []
    for r in range(rank):
        net = conv(net, "PosePrelogitsBasedAttention/Conv2d_PrePose_Attn" + (str(r) if r else ""))
        att.append(net)
    attention_logits = torch.stack(att, -1) if rank > 1 else att[0]
    top = last_conv if keep is None else last_conv * keep
    logits = [conv(top, "PosePrelogitsBasedAttention/" + ("Conv" if r == 0 else f"Conv_{r}"))
              for r in range(rank)]
    logits = torch.stack(logits, -1) if rank > 1 else logits[0]
    logits = (attention_logits * logits).mean((1, 2))  # [B, H, W, 1(, P)] * [B, H, W, K(, P)]
    if rank > 1:
        logits = logits.sum(-1)
    return logits, pose_logits, t


AP_BACKENDS = ["reference"] + backends_for("attentional_pooling", "cpu", F64)


@pytest.mark.parametrize("pose", [False, True], ids=["attention", "pose"])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("clip", [False, True], ids=["image", "clip"])
def test_attentional_pooling_from_official(rank, pose, clip):
    g = torch.Generator().manual_seed(10 + rank)
    B, T, C, K, H, W = 2, 3, 5, 4, 3, 2
    v = tf_variables(g, C, K, rank, pose)
    x = randn(g, B, T, C, H, W) if clip else randn(g, B, C, H, W)
    xo = x.clone().requires_grad_()
    frames = xo.reshape(-1, C, H, W).permute(0, 2, 3, 1)     # the graph's NHWC frames
    want, hm, t = girdhar_graph(v, frames, rank, pose)
    if clip:  # FramePooling: the frames' logits averaged
        want = want.reshape(B, T, K).mean(1)
    g_out = randn(g, *want.shape)
    outs, gouts = [want], [g_out]
    if pose:
        g_hm = randn(g, *hm.shape)
        outs.append(hm)
        gouts.append(g_hm)
    top = [t[f"PosePrelogitsBasedAttention/{'Conv' if p == 0 else f'Conv_{p}'}/weights"]
           for p in range(rank)]
    wgrads = torch.autograd.grad(outs, [xo] + top, gouts)
    for backend in AP_BACKENDS:
        ns = reference if backend == "reference" else attnpool
        kw = {} if backend == "reference" else {"backend": backend}
        mod = ns.AttentionalPooling.from_official(v, pose=pose, **kw).eval()
        assert mod.rank == rank and mod.top_down_dropout == 0.8
        xm = x.clone().requires_grad_()
        if pose:
            got, heat = mod(xm, return_heatmaps=True)
            heat_nhwc = heat.reshape(-1, *heat.shape[-3:]).permute(0, 2, 3, 1)
            close(heat_nhwc, hm, f"rank {rank} {backend} heatmaps")
            ours = [got, heat]
            ograds = [g_out, g_hm.permute(0, 3, 1, 2).reshape(heat.shape)]
        else:
            got = mod(xm)
            ours, ograds = [got], [g_out]
        close(got, want, f"rank {rank} {backend} logits")
        grads = torch.autograd.grad(ours, [xm, mod.weight_top_down], ograds)
        close(grads[0], wgrads[0], f"rank {rank} {backend} grad x")
        for p in range(rank):  # [1, 1, C, K] -> [K, C]
            close(grads[1][p], wgrads[1 + p][0, 0].t(), f"rank {rank} {backend} grad top-down {p}")


@pytest.mark.parametrize("pose", [False, True], ids=["attention", "pose"])
def test_attentional_pooling_official_dropout(pose):
    """In training the official dropout (keep 0.2) hits the top-down input only: with the same
    mask, ours equals the graph. The mask: torch's dropout draws on our NCHW layout."""
    g = torch.Generator().manual_seed(20)
    B, C, K, H, W = 2, 5, 3, 3, 3
    v = tf_variables(g, C, K, 2, pose)
    x = randn(g, B, C, H, W)
    torch.manual_seed(0)
    keep = F.dropout(torch.ones(B, C, H, W, dtype=F64), 0.8).permute(0, 2, 3, 1)
    xo = x.clone().requires_grad_()
    want, _, _ = girdhar_graph(v, xo.permute(0, 2, 3, 1), 2, pose, keep=keep)
    assert (keep == 0).any() and (keep != 0).any()
    g_out = randn(g, *want.shape)
    (wgrad,) = torch.autograd.grad(want, [xo], g_out)
    for backend in AP_BACKENDS:
        ns = reference if backend == "reference" else attnpool
        kw = {} if backend == "reference" else {"backend": backend}
        mod = ns.AttentionalPooling.from_official(v, pose=pose, **kw).train()
        xm = x.clone().requires_grad_()
        torch.manual_seed(0)
        got = mod(xm)
        close(got, want, f"dropout {backend} logits")
        close(torch.autograd.grad(got, [xm], g_out)[0], wgrad, f"dropout {backend} grad x")
        mod.eval()  # no dropout at evaluation
        close(mod(x), girdhar_graph(v, x.permute(0, 2, 3, 1), 2, pose)[0], f"eval {backend}")


def official_pose_loss(logits_pose, labels_pose, valid):
    """src/loss.py, LOSS_FN_POSE='l2' (not sampled), NHWC: per keypoint channel the batch mean
    of where(valid, 0.5·Σ_hw (lbl − lgt)² / Σ mask, 0), summed over the channels."""
    elements = []
    for j in range(logits_pose.shape[-1]):
        lgt, lbl = logits_pose[..., j], labels_pose[..., j]
        mask = torch.ones(lgt.shape, dtype=F64)
        loss_val = 0.5 * torch.square(lbl - lgt).sum((1, 2)) / mask.sum()
        elements.append(torch.where(valid[:, j], loss_val, torch.zeros_like(loss_val)).mean())
    return torch.stack(elements).sum()


@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 3, 4, 5, 2)], ids=["images", "clips"])
def test_pose_loss_official(shape):
    g = torch.Generator().manual_seed(30)
    heat, target = randn(g, *shape), randn(g, *shape)
    valid = torch.rand(shape[:-2], generator=g) < 0.6
    valid.view(-1)[0] = False
    J, H, W = shape[-3:]
    h_official = heat.clone().requires_grad_()
    nhwc = h_official.reshape(-1, J, H, W).permute(0, 2, 3, 1)     # the graph's layout
    want = official_pose_loss(nhwc, target.reshape(-1, J, H, W).permute(0, 2, 3, 1),
                              valid.reshape(-1, J))
    (want_grad,) = torch.autograd.grad(want, h_official)
    h = heat.clone().requires_grad_()
    got = attnpool.AttentionalPooling.pose_loss(h, target, valid, official=True)
    close(got, want, "official pose loss")
    close(torch.autograd.grad(got, h)[0], want_grad, "official pose loss gradient")
    # the default is the plain MSE, unchanged
    close(attnpool.AttentionalPooling.pose_loss(heat, target), F.mse_loss(heat, target), "mse")
    with pytest.raises(ValueError, match="valid must have shape"):
        attnpool.AttentionalPooling.pose_loss(heat, target, valid[..., :1])
    with pytest.raises(TypeError, match="valid must be a bool Tensor"):
        attnpool.AttentionalPooling.pose_loss(heat, target, valid.double())


def test_attentional_pooling_from_official_bad_input():
    g = torch.Generator().manual_seed(40)
    v = tf_variables(g, 5, 3, 2, pose=True, D=6)
    att = "PosePrelogitsBasedAttention/"
    # optimizer slots and other scopes (the backbone) are ignored
    ok = {**v, att + "Conv/weights/Momentum": v[att + "Conv/weights"],
          "resnet_v1_101/block4/weights": np.zeros((1, 1, 2, 2))}
    attnpool.AttentionalPooling.from_official(ok, pose=True)
    with pytest.raises(ValueError, match=r"'PosePrelogitsBasedAttention/Conv2d_PrePose_Attn/weights' "
                                         r"must have shape \[1, 1, C=5, 1\], got \[1, 1, 6, 1\]"):
        attnpool.AttentionalPooling.from_official(v)  # pose pre-logits' maps without pose=True
    with pytest.raises(ValueError, match=r"missing 'PosePrelogitsBasedAttention/Conv_1/weights' "
                                         r"\(shape \[1, 1, C=5, K=3\]\)"):
        attnpool.AttentionalPooling.from_official(
            {k: a for k, a in v.items() if not k.startswith(att + "Conv_1/")}, pose=True)
    with pytest.raises(ValueError, match="must have shape"):  # per-class attention maps
        attnpool.AttentionalPooling.from_official(
            {**v, att + "Conv2d_PrePose_Attn/weights": np.zeros((1, 1, 6, 3))}, pose=True)
    with pytest.raises(ValueError, match=r"unexpected keys \['PosePrelogitsBasedAttention/Conv_2"):
        attnpool.AttentionalPooling.from_official(
            {**v, att + "Conv_2/weights": np.zeros((1, 1, 5, 3))}, pose=True)
    with pytest.raises(ValueError, match="missing 'PoseLogits/ExtraConv2d_1x1/weights'"):
        attnpool.AttentionalPooling.from_official(
            {k: a for k, a in v.items() if not k.startswith("PoseLogits/")}, pose=True)
    with pytest.raises(ValueError, match="TemporalAttention"):
        attnpool.AttentionalPooling.from_official(
            {**v, "TemporalAttention/Conv/weights": np.zeros((1, 1, 3, 1))}, pose=True)
    with pytest.raises(TypeError, match="mapping"):
        attnpool.AttentionalPooling.from_official(list(v.values()))
    scoped = tf_variables(g, 5, 3, 1, scope="tower_0/")
    mod = attnpool.AttentionalPooling.from_official(scoped, scope="tower_0/")
    assert mod.weight_bottom_up.shape == (1, 5)
    with pytest.raises(ValueError, match="top_down_dropout must lie in"):
        attnpool.AttentionalPooling(5, 3, top_down_dropout=1.0)


# ================================================================== spatio-temporal attention
def meng_state_dict(g, C, h1, h2, hidden):
    """Random weights of Action_Att_LSTM's attention part, official names, and some of its other
    layers (the classifier, the unused ones)."""
    sd = {"mask_conv.0.weight": randn(g, h1, C, 3, 3), "mask_conv.3.weight": randn(g, h2, h1, 3, 3),
          "mask_conv.6.weight": randn(g, 1, h2, 3, 3)}
    for i, n in ((1, h1), (4, h2)):
        sd.update({f"mask_conv.{i}.weight": 1 + 0.1 * randn(g, n),
                   f"mask_conv.{i}.bias": 0.1 * randn(g, n),
                   f"mask_conv.{i}.running_mean": 0.1 * randn(g, n),
                   f"mask_conv.{i}.running_var": 1 + torch.rand(n, generator=g, dtype=F64),
                   f"mask_conv.{i}.num_batches_tracked": torch.tensor(7)})
    sd["conv_lstm.cell_list.0.conv.weight"] = 0.3 * randn(g, 4 * hidden, C + hidden, 3, 3)
    sd["conv_lstm.cell_list.0.conv.bias"] = 0.3 * randn(g, 4 * hidden)
    sd["fc_attention.weight"] = randn(g, 1, hidden)
    sd["fc_attention.bias"] = randn(g, 1)
    sd.update({"fc.weight": randn(g, 7, hidden), "fc.bias": randn(g, 7),
               "att_bias": randn(g, 49), "lstm_cell.weight_ih": randn(g, 4 * hidden, C)})
    return sd


def meng_official(sd, input_x, T, training=False, seed=None):
    """Action_Att_LSTM.forward on input_x [B, C, T, H, W] (the features transposed as the official
    loop does) and the official regularisers (train(): tv_loss + contrast_loss, and att_reg,
    with tv_reg_factor 1e-5, constrast_reg_factor 1e-4, hp_reg_factor 1); and the batch norms'
    running statistics after the call."""
    C, H, W = input_x.shape[1], input_x.shape[-2], input_x.shape[-1]
    if training:
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # nn.Dropout2d(p=0.2) on the 5-D input, as the official
            warnings.simplefilter("ignore")
            input_x = F.dropout2d(input_x, 0.2, True)
    input_x = input_x.transpose(1, 2).contiguous().view(-1, C, H, W)
    running = {f"mask_net.{i}.{k}": sd[f"mask_conv.{i}.{k}"].detach().clone()
               for i in (1, 4) for k in ("running_mean", "running_var")}

    def bn(t, i):  # nn.BatchNorm2d: batch statistics in training, updating the running ones
        return F.batch_norm(t, running[f"mask_net.{i}.running_mean"],
                            running[f"mask_net.{i}.running_var"], sd[f"mask_conv.{i}.weight"],
                            sd[f"mask_conv.{i}.bias"], training)
    m = torch.relu(bn(F.conv2d(input_x, sd["mask_conv.0.weight"], padding=1), 1))
    m = torch.relu(bn(F.conv2d(m, sd["mask_conv.3.weight"], padding=1), 4))
    mask = torch.sigmoid(F.conv2d(m, sd["mask_conv.6.weight"], padding=1))
    mask = mask.view(-1, T, 1, H, W)
    input_x = input_x.view(-1, T, C, H, W)
    diff_i = torch.sum(torch.abs(mask[:, :, :, :, 1:] - mask[:, :, :, :, :-1]))
    diff_j = torch.sum(torch.abs(mask[:, :, :, 1:, :] - mask[:, :, :, :-1, :]))
    tv_loss = 1e-5 * (diff_i + diff_j)
    mask_A = (mask > 0.5).double()
    mask_B = (mask < 0.5).double()
    contrast_loss = -(mask * mask_A).mean(0).sum() * 1e-4 * 0.5 \
        + (mask * mask_B).mean(0).sum() * 1e-4 * 0.5
    mask_input_x = mask * input_x
    # ConvLSTM (one layer, batch_first, zero initial state): ConvLSTMCell.forward per frame
    w, b = sd["conv_lstm.cell_list.0.conv.weight"], sd["conv_lstm.cell_list.0.conv.bias"]
    hidden = w.shape[0] // 4
    h = torch.zeros(mask_input_x.shape[0], hidden, H, W, dtype=F64)
    c = torch.zeros_like(h)
    output_inner = []
    for t in range(T):
        combined = torch.cat([mask_input_x[:, t], h], dim=1)
        cc_i, cc_f, cc_o, cc_g = torch.split(F.conv2d(combined, w, b, padding=1), hidden, dim=1)
        c = torch.sigmoid(cc_f) * c + torch.sigmoid(cc_i) * torch.tanh(cc_g)
        h = torch.sigmoid(cc_o) * torch.tanh(c)
        output_inner.append(h)
    output = torch.stack(output_inner, dim=1)
    output = torch.mean(output, dim=4)
    output = torch.mean(output, dim=3)
    att_weight = F.linear(output, sd["fc_attention.weight"], sd["fc_attention.bias"]).view(-1, T)
    att_weight = F.softmax(att_weight, dim=1)
    weighted_output = torch.sum(output * att_weight.unsqueeze(dim=2), dim=1)
    att_reg = F.relu(att_weight[:, :-2] * att_weight[:, 2:]
                     - att_weight[:, 1:-1].pow(2)).sqrt().mean()
    return weighted_output, att_weight, mask[:, :, 0], tv_loss + contrast_loss, att_reg, running


ST_BACKENDS = ["reference"] + backends_for("st_regularizer", "cpu", F64)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("T", [4, 1])
def test_spatiotemporal_from_official(training, T):
    g = torch.Generator().manual_seed(50 + T)
    B, C, H, W, h1, h2, hidden = 2, 6, 3, 3, 4, 3, 5
    sd = meng_state_dict(g, C, h1, h2, hidden)
    x = randn(g, B, T, C, H, W)                       # ours: [B, T, C, H, W]
    osd = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in sd.items()}
    xo = x.clone().requires_grad_()
    pooled, w, mask, reg, att_reg, stats = meng_official(osd, xo.transpose(1, 2), T, training, 3)
    if T >= 3:
        reg = reg + att_reg
    else:  # the official mean over no frame triples is NaN; ours (unimodality) is 0
        assert torch.isnan(att_reg)
    g_out = randn(g, B, hidden)
    keys = ["conv_lstm.cell_list.0.conv.weight", "fc_attention.weight", "mask_conv.0.weight",
            "mask_conv.4.weight"]
    wgrads = torch.autograd.grad((pooled * g_out).sum() + reg, [xo] + [osd[k] for k in keys])
    ours_names = ["convlstm.conv.weight", "temporal_scorer.weight", "mask_net.0.weight",
                  "mask_net.4.weight"]
    for backend in ST_BACKENDS:
        ns = reference if backend == "reference" else attnpool
        kw = {} if backend == "reference" else {"backend": backend}
        mod = ns.SpatioTemporalAttention.from_official(sd, **kw).train(training)
        assert mod.temporal == "convlstm" and mod.dropout == 0.2 and mod.out_features == hidden
        xm = x.clone().requires_grad_()
        torch.manual_seed(3)
        got, got_mask, got_w = mod(xm, return_attention=True)
        close(got, pooled, f"T={T} {backend} pooled")
        close(got_w, w, f"T={T} {backend} temporal weights")
        close(got_mask, mask, f"T={T} {backend} mask")
        got_reg = mod.regularizer(got_mask, got_w)
        close(got_reg, reg, f"T={T} {backend} regulariser")
        params = dict(mod.named_parameters())
        grads = torch.autograd.grad((got * g_out).sum() + got_reg,
                                    [xm] + [params[k] for k in ours_names])
        close(grads[0], wgrads[0], f"T={T} {backend} grad x")
        for name, a, b in zip(keys, grads[1:], wgrads[1:]):
            close(a, b, f"T={T} {backend} grad {name}")
        buffers = dict(mod.named_buffers())
        for name, value in stats.items():
            close(buffers[name], value, f"T={T} {backend} {name}")


def test_spatiotemporal_linear_default_unchanged():
    """temporal='linear' stays the default and its state_dict keys are today's."""
    mod = attnpool.SpatioTemporalAttention(6, (4, 3))
    assert mod.temporal == "linear" and mod.dropout == 0.0 and mod.out_features == 6
    assert not any(k.startswith("convlstm") for k in mod.state_dict())
    assert mod.temporal_scorer.in_features == 6
    assert all(m.bias is None for m in mod.mask_net if isinstance(m, torch.nn.Conv2d))


def test_spatiotemporal_from_official_bad_input():
    g = torch.Generator().manual_seed(60)
    sd = meng_state_dict(g, 6, 4, 3, 5)
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # torch 0.4.0
    mod = reference.SpatioTemporalAttention.from_official(old)
    assert mod.mask_net[1].num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match=r"unexpected keys \['conv_lstm.cell_list.1.conv.weight'\]"):
        reference.SpatioTemporalAttention.from_official(
            {**sd, "conv_lstm.cell_list.1.conv.weight": randn(g, 20, 10, 3, 3)})
    with pytest.raises(ValueError, match=r"missing 'fc_attention.bias' \(shape \[1\]\)"):
        reference.SpatioTemporalAttention.from_official(
            {k: v for k, v in sd.items() if k != "fc_attention.bias"})
    with pytest.raises(ValueError, match=r"'mask_conv.3.weight' must have shape \[h2, h1=4, 3, 3\]"):
        reference.SpatioTemporalAttention.from_official({**sd, "mask_conv.3.weight": randn(g, 3, 5, 3, 3)})
    with pytest.raises(ValueError, match=r"\[4·H, C \+ H, 3, 3\] with C=6"):
        reference.SpatioTemporalAttention.from_official(
            {**sd, "conv_lstm.cell_list.0.conv.weight": randn(g, 20, 12, 3, 3)})
    with pytest.raises(ValueError, match=r"'fc_attention.weight' must have shape \[1, H=5\]"):
        reference.SpatioTemporalAttention.from_official({**sd, "fc_attention.weight": randn(g, 1, 4)})
    with pytest.raises(ValueError, match="temporal must be one of"):
        attnpool.SpatioTemporalAttention(6, temporal="lstm")
    with pytest.raises(ValueError, match="dropout must lie in"):
        attnpool.SpatioTemporalAttention(6, dropout=-0.1)


def test_convlstm_dropout_draws_as_dropout2d():
    """The input dropout draws nn.Dropout2d's noise on the official [B, C, T, H, W] layout."""
    x = torch.randn(3, 4, 5, 2, 2, dtype=F64)      # [B, T, C, H, W]
    mod = reference.SpatioTemporalAttention(5, (2, 2), dropout=0.5, dtype=F64).train()
    seen = {}
    mod.mask_net.register_forward_pre_hook(lambda m, i: seen.update(x=i[0]))
    torch.manual_seed(11)
    mod(x)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = F.dropout2d(x.transpose(1, 2), 0.5, True).transpose(1, 2)
    close(seen["x"], want.reshape(-1, 5, 2, 2), "dropped-out input")
    dropped = (seen["x"].reshape(3, 4, 5, 4) == 0).all(-1)            # [B, T, C]
    assert dropped.any() and (dropped == dropped[:, :1]).all()      # whole channels, all frames
