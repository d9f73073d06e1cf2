"""Converters from the official codes' checkpoints to attnpool's modules.

Every module's ``from_official`` classmethod calls one of these; they live here, apart from
the modules' math, because they are about other codes' formats (names, layouts, scopes) and
share one way of checking them. Each maps the official parameters to ours, checks every key
and shape (``ValueError`` naming the key and the shape it must have; ``TypeError`` for a value
that is no array), and returns the class it was called on (``attnpool.reference.X`` or the
fused ``attnpool.X``) set up to compute what the official module computes:

- longxiang92/Flash-MNIST (PyTorch) ``ShiftingAttention``: ``AttentionCluster``, fc1,
  ``eps=0`` (its norm has no eps);
- PaddlePaddle/models, PaddleCV video ``attention_cluster`` (``satt{i}``):
  ``AttentionCluster`` / ``MultimodalAttentionClusters``, fc1, ``eps_placement="sqrt"``;
- mindspore-ai/models ``research/cv/AttentionCluster`` ``ShiftingAttention``:
  ``AttentionCluster``, fc1 or fc2, ``eps=0``;
- rohitgirdhar/AttentionalPoolingAction (TensorFlow) ``PosePrelogitsBasedAttention``
  (+ ``PoseLogits``): ``AttentionalPooling``, chained ranks unrolled, top-down dropout 0.8;
- LiliMeng/spatial_temporal_att_* ``Action_Att_LSTM``: ``SpatioTemporalAttention``,
  ``temporal="convlstm"``, input dropout 0.2.

Values may be torch tensors or numpy arrays (TensorFlow's checkpoint reader, PaddlePaddle's
``load_program_state`` and MindSpore's parameters' ``asnumpy()`` give numpy). The module gets
the checkpoint's dtype unless ``dtype=`` is given; other keyword arguments go to the module's
constructor and override the converter's settings (e.g. ``backend="cpp"``, ``eps=1e-12``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "attention_cluster", "attentional_pooling", "multimodal_attention_clusters",
    "spatiotemporal_attention",
]

CLUSTER_SOURCES = ("flash-mnist", "paddle", "mindspore")


class _Checkpoint:
    """The official parameters whose names start with ``prefix`` (others are not this module's
    and are ignored), taken one by one with their shapes checked. Shapes are tuples of sizes and
    names; a name is bound by its first use, in ``sizes`` (shared between checkpoints)."""

    def __init__(self, state, prefix: str, source: str, sizes: dict[str, int] | None = None):
        if not isinstance(state, Mapping):
            raise TypeError(f"{source} checkpoint must be a mapping of names to arrays, "
                            f"got {type(state).__name__}")
        self.prefix, self.source = prefix, source
        self.sizes = {} if sizes is None else sizes
        self.left = {k[len(prefix):]: v for k, v in state.items()
                     if isinstance(k, str) and k.startswith(prefix)}

    def has(self, key: str) -> bool:
        return key in self.left

    def _shape(self, dims) -> str:
        return "[" + ", ".join(str(d) if isinstance(d, int) else
                               f"{d}={self.sizes[d]}" if d in self.sizes else d
                               for d in dims) + "]"

    def _fits(self, shape, dims) -> bool:
        if len(shape) != len(dims):
            return False
        return all(s == (d if isinstance(d, int) else self.sizes.get(d, s))
                   for s, d in zip(shape, dims))

    def take(self, key: str, *shapes: tuple) -> Tensor:
        """The value of ``key`` as a tensor of one of ``shapes`` (its names then bound)."""
        name = self.prefix + key
        want = " or ".join(self._shape(dims) for dims in shapes)
        if key not in self.left:
            raise ValueError(f"{self.source} checkpoint: missing {name!r} (shape {want})")
        value = self.left.pop(key)
        if isinstance(value, Tensor):
            t = value.detach().clone()
        elif hasattr(value, "__array__"):
            t = torch.tensor(value)
        else:
            raise TypeError(f"{self.source} checkpoint: {name!r} must be a tensor or numpy array "
                            f"of shape {want}, got {type(value).__name__}")
        for dims in shapes:
            if self._fits(t.shape, dims):
                for s, d in zip(t.shape, dims):
                    if isinstance(d, str):
                        self.sizes.setdefault(d, s)
                return t
        raise ValueError(f"{self.source} checkpoint: {name!r} must have shape {want}, "
                         f"got {list(t.shape)}")

    def done(self, others: tuple[str, ...] = (), hint: str = "") -> None:
        """Every key taken, but those of the official model's ``others`` parts."""
        extra = sorted(self.prefix + k for k in self.left
                       if not any(k == o or k.startswith(o + ".") for o in others))
        if extra:
            raise ValueError(f"{self.source} checkpoint: unexpected keys {extra}{hint}")


def _build(cls, args: tuple, settings: dict, kwargs: dict, params: dict[str, Tensor]):
    """cls(*args, **settings overridden by kwargs) in the checkpoint's dtype (unless given),
    holding ``params``."""
    options = {**settings, **kwargs}
    if options.get("dtype") is None:
        options["dtype"] = next(t.dtype for t in params.values() if t.is_floating_point())
    module = cls(*args, **options)
    module.load_state_dict(params)
    return module


# ------------------------------------------------------------------ attention clusters
def _cluster_params(ck: _Checkpoint, source: str) -> tuple[tuple, dict, dict]:
    """(constructor args, settings, our state_dict) of one official shifting-attention module."""
    params = {}
    if source == "flash-mnist":
        # attentions = nn.Conv1d(F, N, 1); norm without eps: o / ||o|| / sqrt(N)
        params["weight"] = ck.take("attentions.weight", ("N", "F", 1))[..., 0]
        params["bias"] = ck.take("attentions.bias", ("N",))
        alpha, beta = "w", "b"
        settings = {"attention": "fc1", "eps": 0.0, "eps_placement": "clamp"}
    elif source == "paddle":
        # conv2d of [B, F, L, 1] to N channels; fluid.layers.l2_normalize: x / sqrt(Σx² + 1e-12)
        params["weight"] = ck.take("conv.weight", ("N", "F", 1, 1))[..., 0, 0]
        params["bias"] = ck.take("conv.bias", ("N",))
        alpha, beta = "shift_w", "shift_b"
        settings = {"attention": "fc1", "eps": 1e-12, "eps_placement": "sqrt"}
    elif source == "mindspore":
        # seq = [Conv1d(F, N)] (fc1) or [Conv1d(F, H), Tanh, Conv1d(H, N)] (fc2); nn.Norm: no eps.
        # MindSpore 1.x stores Conv1d kernels as [out, in, 1, 1].
        if ck.has("seq.2.weight"):
            params["weight1"] = ck.take("seq.0.weight", ("H", "F", 1), ("H", "F", 1, 1)).flatten(1)
            params["bias1"] = ck.take("seq.0.bias", ("H",))
            params["weight"] = ck.take("seq.2.weight", ("N", "H", 1), ("N", "H", 1, 1)).flatten(1)
            params["bias"] = ck.take("seq.2.bias", ("N",))
            settings = {"attention": "fc2", "hidden_features": ck.sizes["H"]}
        else:
            params["weight"] = ck.take("seq.0.weight", ("N", "F", 1), ("N", "F", 1, 1)).flatten(1)
            params["bias"] = ck.take("seq.0.bias", ("N",))
            settings = {"attention": "fc1"}
        settings.update(eps=0.0, eps_placement="clamp")
        alpha, beta = "w", "b"
    else:
        raise ValueError(f"source must be one of {CLUSTER_SOURCES}, got {source!r}")
    params["alpha"] = ck.take(alpha, ("N",))
    params["beta"] = ck.take(beta, ("N",))
    return (ck.sizes["F"], ck.sizes["N"]), settings, params


def attention_cluster(cls, state_dict, source: str, *, prefix: str = "", **kwargs):
    """``cls`` (an AttentionCluster class) from one official shifting-attention module.

    Keys (after ``prefix``, e.g. ``"satt0."`` for PaddlePaddle, ``"att.0."`` for MindSpore;
    keys outside the prefix are ignored):

    - ``"flash-mnist"``: ``attentions.weight [N, F, 1]``, ``attentions.bias [N]``, ``w [N]``,
      ``b [N]``; its norm has no eps: ``eps=0`` (a zero shifted vector gives NaN, as there).
    - ``"paddle"``: ``conv.weight [N, F, 1, 1]``, ``conv.bias [N]``, ``shift_w [N]``,
      ``shift_b [N]``; ``eps_placement="sqrt"``, ``eps=1e-12`` (``l2_normalize``).
    - ``"mindspore"``: fc1 ``seq.0.weight [N, F, 1(, 1)]``, ``seq.0.bias``; fc2 also
      ``seq.2.*`` (``seq.0`` is then the hidden layer); ``w``, ``b``; ``eps=0``.
    """
    ck = _Checkpoint(state_dict, prefix, str(source))
    args, settings, params = _cluster_params(ck, source)
    ck.done()
    return _build(cls, args, settings, kwargs, params)


def multimodal_attention_clusters(cls, state_dict, source: str = "paddle", *,
                                  modalities: tuple[str, ...] = ("rgb", "audio"), **kwargs):
    """``cls`` (a MultimodalAttentionClusters class) from PaddlePaddle's ``AttentionCluster``
    model: cluster ``satt{i}`` becomes modality ``modalities[i]`` (PaddlePaddle numbers them in
    its ``feature_names`` order, rgb then audio for its YouTube-8M model). Keys outside the
    clusters (its fc1, fc2 and logistic classifier) are ignored."""
    if source != "paddle":
        raise ValueError(f"source must be 'paddle' (the official multimodal model), got {source!r}")
    modalities = tuple(modalities)
    if not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must name each cluster once, got {modalities}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"paddle checkpoint must be a mapping of names to arrays, "
                        f"got {type(state_dict).__name__}")
    found = sorted({int(m.group(1)) for k in state_dict if isinstance(k, str)
                    for m in [re.match(r"satt(\d+)\.", k)] if m})
    if found != list(range(len(modalities))):
        raise ValueError(f"paddle checkpoint holds clusters {[f'satt{i}' for i in found]}, but "
                         f"modalities names {len(modalities)}: {modalities}")
    shapes, clusters, settings = {}, {}, {}
    for i, name in enumerate(modalities):
        ck = _Checkpoint(state_dict, f"satt{i}.", "paddle")
        shapes[name], settings, clusters[name] = _cluster_params(ck, "paddle")
        ck.done()
    params = {f"clusters.{name}.{k}": v for name, p in clusters.items() for k, v in p.items()}
    return _build(cls, (shapes,), settings, kwargs, params)


# ------------------------------------------------------------------ attentional pooling
def _tf_variables(variables, source: str) -> dict:
    """The model's own variables: optimizer slots and moving averages ('<layer>/weights/Momentum',
    ...) are left out, their names being deeper than '<layer>/weights'."""
    if not isinstance(variables, Mapping):
        raise TypeError(f"{source} variables must be a mapping of names to arrays, "
                        f"got {type(variables).__name__}")
    return {k: v for k, v in variables.items()
            if not (isinstance(k, str) and re.search(r"/(weights|biases)/", k))}


def attentional_pooling(cls, variables, *, pose: bool = False, scope: str = "", **kwargs):
    """``cls`` (an AttentionalPooling class) from Girdhar's TensorFlow graph
    (``models/slim/nets/nets_factory.py``, ``USE_POSE_PRELOGITS_BASED_ATTENTION``).

    ``variables``: name -> array, as ``tf.train.load_checkpoint(path)`` gives them
    (``reader.get_tensor(name)`` for every name); ``scope``: a prefix of those names, if any.
    The head's variables, 1×1 convs as ``[1, 1, in, out]`` kernels:

    - ``PosePrelogitsBasedAttention/Conv2d_PrePose_Attn/{weights [1, 1, D, 1], biases [1]}``:
      the bottom-up map of rank 1, from x (``D = C``) or, with ``pose=True``, from the pose
      pre-logits (``D`` = 768). Ranks p ≥ 2: ``Conv2d_PrePose_Attn{p-1}`` ``[1, 1, 1, 1]``,
      which the graph applies to map p-1 (map p = a·map_{p-1} + c): converted exactly to
      independent maps, ``weight_bottom_up[p] = a·weight_bottom_up[p-1]``,
      ``bias_bottom_up[p] = a·bias_bottom_up[p-1] + c``.
    - ``PosePrelogitsBasedAttention/Conv, Conv_1, ...`` ``{weights [1, 1, C, K], biases [K]}``:
      the top-down maps, one per rank.
    - ``pose=True``: ``PoseLogits/ExtraConv2d_1x1 [1, 1, C, D]`` (+ ReLU) and
      ``PoseLogits/Conv2d_1c_1x1 [1, 1, D, J]`` (the keypoint heatmaps).

    The module gets ``top_down_dropout=0.8``: the graph's ``slim.dropout`` of the top-down
    input with keep probability 0.2 (``NET.DROPOUT = -1``), in training only. Variables outside
    these scopes (the backbone, the other branch) are ignored.
    """
    variables = _tf_variables(variables, "TensorFlow")
    if any(isinstance(k, str) and k.startswith(scope + "TemporalAttention/") for k in variables):
        raise ValueError(f"TensorFlow variables: {scope}TemporalAttention/ (NET.USE_TEMPORAL_ATT) "
                         "is not supported (attnpool averages the frames' logits)")
    att = _Checkpoint(variables, scope + "PosePrelogitsBasedAttention/", "TensorFlow")
    rank = 1
    while att.has(f"Conv2d_PrePose_Attn{rank}/weights"):
        rank += 1
    params = {}
    top = [(att.take(f"{'Conv' if p == 0 else f'Conv_{p}'}/weights", (1, 1, "C", "K"))[0, 0].t(),
            att.take(f"{'Conv' if p == 0 else f'Conv_{p}'}/biases", ("K",))) for p in range(rank)]
    params["weight_top_down"] = torch.stack([w for w, _ in top])
    params["bias_top_down"] = torch.stack([b for _, b in top])
    bottom_in = "D" if pose else "C"
    w = att.take("Conv2d_PrePose_Attn/weights", (1, 1, bottom_in, 1))[0, 0, :, 0]
    b = att.take("Conv2d_PrePose_Attn/biases", (1,))[0]
    weights, biases = [w], [b]
    for p in range(1, rank):  # the chained scalar convs, unrolled
        a = att.take(f"Conv2d_PrePose_Attn{p}/weights", (1, 1, 1, 1)).reshape(())
        c = att.take(f"Conv2d_PrePose_Attn{p}/biases", (1,))[0]
        weights.append(a * weights[-1])
        biases.append(a * biases[-1] + c)
    params["weight_bottom_up"] = torch.stack(weights)
    params["bias_bottom_up"] = torch.stack(biases)
    att.done(hint=" (per-class attention, softmax / relu attention maps and pose features in "
                  "the top-down path are not supported)")
    settings = {"rank": rank, "top_down_dropout": 0.8}
    if pose:
        head = _Checkpoint(variables, scope + "PoseLogits/", "TensorFlow", att.sizes)
        params["pose_weight"] = head.take("ExtraConv2d_1x1/weights", (1, 1, "C", "D"))[0, 0].t()
        params["pose_bias"] = head.take("ExtraConv2d_1x1/biases", ("D",))
        params["heatmap_weight"] = head.take("Conv2d_1c_1x1/weights", (1, 1, "D", "J"))[0, 0].t()
        params["heatmap_bias"] = head.take("Conv2d_1c_1x1/biases", ("J",))
        head.done()
        settings.update(pose_keypoints=att.sizes["J"], pose_channels=att.sizes["D"])
    return _build(cls, (att.sizes["C"], att.sizes["K"]), settings, kwargs,
                  {k: v.contiguous() for k, v in params.items()})


# ------------------------------------------------------------------ spatio-temporal attention
# The parts of the official Action_Att_LSTM that are not its attention: the classifier `fc` and
# layers it defines but never calls.
MENG_OTHER_PARTS = ("fc", "fc_out", "att_vw", "att_hw", "att_bias", "att_vw_bn", "att_hw_bn",
                    "fc_c0_0", "fc_c0_1", "fc_h0_0", "fc_h0_1", "lstm_cell")


def spatiotemporal_attention(cls, state_dict, **kwargs):
    """``cls`` (a SpatioTemporalAttention class) from Meng et al.'s ``Action_Att_LSTM``
    (``spatial_temporal_attention/*_spa_temp_att.py``): ``mask_conv.{0,1,3,4,6}`` (the mask
    network: convs without bias, batch norms), ``conv_lstm.cell_list.0.conv.{weight
    [4·H, C + H, 3, 3], bias [4·H]}`` (a one-layer ConvLSTM, gates i, f, o, g) and
    ``fc_attention.{weight [1, H], bias [1]}``. The module gets ``temporal="convlstm"`` and the
    official input dropout, ``dropout=0.2``. The official model's other parts
    (``MENG_OTHER_PARTS``: its classifier ``fc`` and unused layers) are ignored."""
    ck = _Checkpoint(state_dict, "", "Meng et al.")
    params = {"mask_net.0.weight": ck.take("mask_conv.0.weight", ("h1", "C", 3, 3)),
              "mask_net.3.weight": ck.take("mask_conv.3.weight", ("h2", "h1", 3, 3)),
              "mask_net.6.weight": ck.take("mask_conv.6.weight", (1, "h2", 3, 3))}
    for i, size in ((1, "h1"), (4, "h2")):  # batch norms; num_batches_tracked since torch 0.4.1
        for name in ("weight", "bias", "running_mean", "running_var"):
            params[f"mask_net.{i}.{name}"] = ck.take(f"mask_conv.{i}.{name}", (size,))
        key = f"mask_conv.{i}.num_batches_tracked"
        params[f"mask_net.{i}.num_batches_tracked"] = (
            ck.take(key, ()) if ck.has(key) else torch.tensor(0))  # a fresh counter, as torch's
    lstm = ck.take("conv_lstm.cell_list.0.conv.weight", ("4H", "C+H", 3, 3))
    hidden, channels = ck.sizes["4H"] // 4, ck.sizes["C"]
    if ck.sizes["4H"] % 4 or ck.sizes["C+H"] != channels + hidden:
        raise ValueError(f"Meng et al. checkpoint: 'conv_lstm.cell_list.0.conv.weight' must have "
                         f"shape [4·H, C + H, 3, 3] with C={channels}, got {list(lstm.shape)}")
    params["convlstm.conv.weight"] = lstm
    params["convlstm.conv.bias"] = ck.take("conv_lstm.cell_list.0.conv.bias", ("4H",))
    params["temporal_scorer.weight"] = ck.take("fc_attention.weight", (1, "H"))
    params["temporal_scorer.bias"] = ck.take("fc_attention.bias", (1,))
    if ck.sizes["H"] != hidden:
        raise ValueError(f"Meng et al. checkpoint: 'fc_attention.weight' must have shape "
                         f"[1, H={hidden}] (the ConvLSTM's hidden size), got "
                         f"{list(params['temporal_scorer.weight'].shape)}")
    ck.done(MENG_OTHER_PARTS, " (only a one-layer ConvLSTM is supported)")
    settings = {"temporal": "convlstm", "temporal_hidden": hidden, "dropout": 0.2}
    return _build(cls, (channels, (ck.sizes["h1"], ck.sizes["h2"])), settings, kwargs, params)
