"""Functional API: input checks, autocast, backend choice, then one op call.

Every function accepts ``backend=`` (None: the :func:`attnpool.use_backend`
context, then ``ATTNPOOL_BACKEND``, then ``"auto"``). ``"reference"`` runs the
plain-PyTorch reference of :mod:`attnpool.reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnpool import backends, ops, reference

__all__ = [
    "attention_cluster", "attentional_pooling", "masked_frame_means", "pose_attentional_pooling",
    "pyramid_attention", "st_regularizer", "temporal_attention_pool",
]


# ---------------------------------------------------------------- input checks
# Error messages are built only when raising: under torch.compile sizes are symbolic, and
# formatting them would break the graph.
def _shape_str(shape: str | tuple) -> str:
    return shape if isinstance(shape, str) else "[" + ", ".join(map(str, shape)) + "]"


def _check_float(name: str, t: Tensor, shape: str | tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor of shape {_shape_str(shape)}, "
                        f"got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {_shape_str(shape)}, "
                        f"got {t.dtype}")


def _check_like(name: str, t: Tensor | None, ref: Tensor, shape: tuple, ref_name: str = "x"
                ) -> None:
    """``t`` has exactly ``shape`` and the device and dtype of ``ref`` (named ``ref_name``)."""
    if t is None:
        return
    _check_float(name, t, shape)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {_shape_str(shape)}, got {list(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; use one "
                        "dtype (or torch.autocast)")


def _autocast(*tensors: Tensor | None) -> list[Tensor | None]:
    """Under torch.autocast, run in the autocast dtype (kernels accumulate in fp32)."""
    x = tensors[0]
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return [None if t is None else t.to(dtype) for t in tensors]
    return list(tensors)


# ========================================================== attention clusters
def attention_cluster(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    alpha: Tensor,
    beta: Tensor,
    lengths: Tensor | None = None,
    *,
    attention: str = "fc1",
    weight1: Tensor | None = None,
    bias1: Tensor | None = None,
    shift: bool = True,
    eps: float = 1e-12,
    eps_placement: str = "clamp",
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention clusters (Long et al. 2018): N attention units pool the frames of ``x``.

    Args:
        x: frame features ``[B, L, F]``.
        weight: unit weights ``[N, F]`` (``[N, H]`` for ``attention="fc2"``; None for "average").
        bias: ``[N]`` or None. The softmax cancels it (its gradient is zero).
        alpha, beta: shifting-operation scale and offset ``[N]``.
        lengths: optional integer ``[B]``; sample b uses its first ``lengths[b]`` frames.
        attention: "fc1" (linear scores), "fc2" (tanh hidden layer ``weight1 [H, F]``,
            ``bias1 [H]``) or "average" (uniform weights).
        shift: apply the shifting operation and L2 norm (``o = (αv+β) / (√N·‖αv+β‖)``).
        eps: the norm's eps, placed by ``eps_placement``: "clamp" (default), ‖u‖ clamped
            below at eps (the first author's code and MindSpore's have no eps: eps=0);
            "sqrt", sqrt(‖u‖² + eps) (PaddlePaddle's l2_normalize).
        backend: "auto", "reference", "cpp", "cuda" or "triton".

    Returns:
        ``(out [B, N*F], attention [B, N, L])``, unit-major output.
    """
    _check_float("x", x, "[B, L, F]")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, L, F], got {list(x.shape)}")
    B, L, Fx = x.shape
    if L < 1 or Fx < 1:
        raise ValueError(f"x must have L >= 1 frames and F >= 1 features, got {list(x.shape)}")
    if attention not in ("fc1", "fc2", "average"):
        raise ValueError(f"attention must be 'fc1', 'fc2' or 'average', got {attention!r}")
    eps_clamp, eps_sqrt = ops.cluster_norm_eps(eps, eps_placement)
    _check_float("alpha", alpha, "[N]")
    if alpha.dim() != 1:
        raise ValueError(f"alpha must have shape [N], got {list(alpha.shape)}")
    N = alpha.shape[0]
    _check_like("alpha", alpha, x, (N,))
    _check_like("beta", beta, x, (N,))
    key_weight = weight1 if attention == "fc2" else weight
    if isinstance(key_weight, Tensor) and key_weight.dim() == 2 and key_weight.shape[1] != Fx:
        raise ValueError(f"x must have shape [B, L, {key_weight.shape[1]}] (the features the "
                         f"weights expect), got {list(x.shape)}")
    if attention == "fc2":
        if weight1 is None:
            raise ValueError("attention='fc2' needs weight1 [H, F] and bias1 [H]")
        H = weight1.shape[0] if weight1.dim() == 2 else -1
        _check_like("weight1", weight1, x, (H, Fx))
        _check_like("bias1", bias1, x, (H,))
        _check_like("weight", weight, x, (N, H))
    elif attention == "fc1":
        if weight is None:
            raise ValueError(f"attention='fc1' needs weight [N={N}, F={Fx}]")
        _check_like("weight", weight, x, (N, Fx))
    if attention != "average":
        _check_like("bias", bias, x, (N,))
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.is_floating_point() or lengths.is_complex() \
                or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer Tensor of shape [B={B}]")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape [B={B}], got {list(lengths.shape)}")
        if lengths.device != x.device and lengths.device.type != "cpu":
            raise ValueError(f"lengths is on {lengths.device} but x is on {x.device}")

    x, weight, bias, alpha, beta, weight1, bias1 = _autocast(
        x, weight, bias, alpha, beta, weight1, bias1)
    name = backends.resolve("attention_cluster", backend, x.device, x.dtype)
    if lengths is not None and (name == "reference" or lengths.device != x.device):
        # kernel backends check inside the op; here the check is free (CPU lengths)
        if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
            ops.check_lengths(lengths, L)
        lengths = lengths.to(x.device, non_blocking=True)
    if name == "reference":
        return reference.attention_cluster(
            x, weight, bias, alpha, beta, lengths, attention=attention,
            weight1=weight1, bias1=bias1, shift=shift, eps=eps, eps_placement=eps_placement)

    if attention == "fc1":  # the op takes the scoring layer itself (see ops.cluster_pool)
        out, attn, _ = ops.call(ops.cluster_pool, x, None, weight, bias, lengths, alpha, beta,
                                shift, eps_clamp, eps_sqrt, name)
        return out, attn.to(x.dtype)
    if attention == "average":
        scores = x.new_zeros(B, L, N)
    else:  # padded frames must not reach the scoring layers' gradients as 0 * NaN
        keys = reference.zero_padded_frames(x, lengths)
        scores = F.linear(torch.tanh(F.linear(keys, weight1, bias1)), weight, bias)
    out, attn, _ = ops.call(ops.cluster_pool, x, scores, None, None, lengths, alpha, beta, shift,
                            eps_clamp, eps_sqrt, name)
    return out, attn.to(x.dtype)


# ========================================================== attentional pooling
def attentional_pooling(
    x: Tensor,
    weight_bottom_up: Tensor,
    bias_bottom_up: Tensor | None,
    weight_top_down: Tensor,
    bias_top_down: Tensor | None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-P attentional pooling (Girdhar & Ramanan, NeurIPS 2017).

    ``score_k = Σ_p mean_i h[p,i]·t[p,k,i]`` with the bottom-up maps
    ``h[p,i] = x_i·weight_bottom_up[p] + bias_bottom_up[p]`` and the top-down maps
    ``t[p,k,i] = x_i·weight_top_down[p,k] + bias_top_down[p,k]``. The kernels use the
    factored form (the ``[n, K]`` top-down maps are never formed):
    ``z_p = mean_i h[p,i]·x_i``,
    ``score_k = Σ_p weight_top_down[p,k]·z_p + bias_top_down[p,k]·mean_i h[p,i]``.

    Args:
        x: features ``[B, C, H, W]`` (NCHW or channels-last) or a clip ``[B, T, C, H, W]``
            (per-frame scores averaged over T).
        weight_bottom_up ``[P, C]``, bias_bottom_up ``[P]`` or None,
        weight_top_down ``[P, K, C]``, bias_top_down ``[P, K]`` or None.
        backend: "auto", "reference", "cpp", "cuda" or "triton".

    Returns:
        ``(logits [B, K], bottom-up maps [B, (T,) P, H, W])``.
    """
    _check_float("weight_bottom_up", weight_bottom_up, "[P, C]")
    if weight_bottom_up.dim() != 2:
        raise ValueError(f"weight_bottom_up must have shape [P, C], "
                         f"got {list(weight_bottom_up.shape)}")
    P, C = weight_bottom_up.shape
    _check_attentional(x, P, C, weight_top_down, bias_top_down)
    _check_like("weight_bottom_up", weight_bottom_up, x, (P, C))
    _check_like("bias_bottom_up", bias_bottom_up, x, (P,))

    x, weight_bottom_up, bias_bottom_up, weight_top_down, bias_top_down = _autocast(
        x, weight_bottom_up, bias_bottom_up, weight_top_down, bias_top_down)
    name = backends.resolve("attentional_pooling", backend, x.device, x.dtype)
    if name == "reference":
        return reference.attentional_pooling(x, weight_bottom_up, bias_bottom_up,
                                             weight_top_down, bias_top_down)
    H, W = x.shape[-2:]
    feats = x.reshape(-1, C, H * W)  # a view for NCHW and channels-last alike
    bb = bias_bottom_up if bias_bottom_up is not None else x.new_zeros(P)
    z, h, m = ops.call(ops.attentional_pool, feats, weight_bottom_up, bb, name)
    return _factored_logits(x, z, h, m, weight_top_down, bias_top_down)


def _check_attentional(x: Tensor, P: int, C: int, weight_top_down: Tensor,
                       bias_top_down: Tensor | None) -> int:
    """Checks the feature map x ``[B, (T,) C, H, W]`` and the top-down parameters
    ``[P, K, C]``, ``[P, K]``; returns K."""
    _check_float("x", x, "[B, C, H, W] or [B, T, C, H, W]")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must have shape [B, C, H, W] or [B, T, C, H, W], got {list(x.shape)}")
    if x.shape[-3] != C:
        lead = "[B, T, " if x.dim() == 5 else "[B, "
        raise ValueError(f"x must have shape {lead}{C}, H, W] (the channels the weights "
                         f"expect), got {list(x.shape)}")
    if x.shape[-2] * x.shape[-1] < 1:
        raise ValueError(f"x must have H, W >= 1, got {list(x.shape)}")
    _check_float("weight_top_down", weight_top_down, "[P, K, C]")
    if weight_top_down.dim() != 3:
        raise ValueError(f"weight_top_down must have shape [P={P}, K, C={C}], "
                         f"got {list(weight_top_down.shape)}")
    K = weight_top_down.shape[1]
    _check_like("weight_top_down", weight_top_down, x, (P, K, C))
    _check_like("bias_top_down", bias_top_down, x, (P, K))
    return K


def _factored_logits(x: Tensor, z: Tensor, h: Tensor, m: Tensor, weight_top_down: Tensor,
                     bias_top_down: Tensor | None) -> tuple[Tensor, Tensor]:
    """logit_k = Σ_p weight_top_down[p,k]·z_p + bias_top_down[p,k]·m_p (m = mean of h, in
    opmath or h's dtype), per-frame logits averaged over T for clips; and the maps h."""
    # one [B, C] x [C, K] product per rank, summed: einsum would first copy weight_top_down
    # into a [P*C, K] layout on every call (13 MiB at P=8, C=1024, K=400: 3x the kernel)
    logits = torch.bmm(z.transpose(0, 1), weight_top_down.transpose(1, 2)).sum(0)
    if bias_top_down is not None:
        logits = logits + (m @ bias_top_down.to(m.dtype)).to(x.dtype)
    lead = x.shape[:-3]
    if x.dim() == 5:
        logits = logits.reshape(*lead, logits.shape[-1]).mean(1)
    return logits, h.reshape(*lead, h.shape[1], *x.shape[-2:])


def pose_attentional_pooling(
    x: Tensor, q: Tensor, weight_bottom_up: Tensor, bias_bottom_up: Tensor | None,
    weight_top_down: Tensor, bias_top_down: Tensor | None, *, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Attentional pooling with bottom-up maps from the pose pre-logits q ``[B, (T,) D, H, W]``
    (weight_bottom_up ``[P, D]``), in the factored form: the pooling of x under the maps runs
    in the fused ``weighted_pool`` kernel. Returns ``(logits [B, K], maps [B, (T,) P, H, W])``."""
    _check_float("weight_top_down", weight_top_down, "[P, K, C]")
    if weight_top_down.dim() != 3:
        raise ValueError(f"weight_top_down must have shape [P, K, C], "
                         f"got {list(weight_top_down.shape)}")
    P, _, C = weight_top_down.shape
    _check_attentional(x, P, C, weight_top_down, bias_top_down)
    _check_float("weight_bottom_up", weight_bottom_up, "[P, D]")
    if weight_bottom_up.dim() != 2 or weight_bottom_up.shape[0] != P:
        raise ValueError(f"weight_bottom_up must have shape [P={P}, D], "
                         f"got {list(weight_bottom_up.shape)}")
    D = weight_bottom_up.shape[1]
    _check_float("q", q, "[B, (T,) D, H, W]")
    if q.shape != (*x.shape[:-3], D, *x.shape[-2:]):
        raise ValueError(f"q must have shape {[*x.shape[:-3], D, *x.shape[-2:]]} (x's batch, "
                         f"frames and H×W with D={D} channels), got {list(q.shape)}")
    _check_like("q", q, x, tuple(q.shape))
    _check_like("weight_bottom_up", weight_bottom_up, x, (P, D))
    _check_like("bias_bottom_up", bias_bottom_up, x, (P,))
    H, W = x.shape[-2:]
    feats = x.reshape(-1, C, H * W)
    h = torch.einsum("pd,bdn->bpn", weight_bottom_up, q.reshape(-1, D, H * W))
    if bias_bottom_up is not None:
        h = h + bias_bottom_up[:, None]
    name = backends.resolve("weighted_pool", backend, x.device, x.dtype)
    z = reference.weighted_pool(feats, h) if name == "reference" else \
        ops.call(ops.weighted_pool, feats, h, name)
    return _factored_logits(x, z, h, h.mean(-1), weight_top_down, bias_top_down)


# ================================================ spatio-temporal attention
def st_regularizer(
    mask: Tensor | None,
    w: Tensor | None,
    tv_weight: float = 1e-5,
    contrast_weight: float = 1e-4,
    unimodal_weight: float = 1.0,
    *,
    sqrt: bool = True,
    tv_reduction: str = "sum",
    unimodal_reduction: str = "mean",
    backend: str | None = None,
) -> Tensor:
    """tv_weight·TV(mask) + contrast_weight·contrast(mask) + unimodal_weight·unimodality(w)
    (Meng et al.; see :mod:`attnpool.losses`) in one fused kernel, forward and backward.

    Args:
        mask: spatial masks ``[B, T, H, W]`` (sigmoid outputs) or None (no mask terms).
        w: temporal weights ``[B, T]`` (softmax over T) or None (no unimodality term).
    Returns a 0-dim tensor in the inputs' dtype.
    """
    for name, r in (("tv_reduction", tv_reduction), ("unimodal_reduction", unimodal_reduction)):
        if r not in ("sum", "mean"):
            raise ValueError(f"{name} must be 'sum' or 'mean', got {r!r}")
    if mask is None and w is None:
        raise ValueError("st_regularizer needs mask [B, T, H, W] or w [B, T]")
    if mask is not None:
        _check_float("mask", mask, "[B, T, H, W]")
        if mask.dim() != 4:
            raise ValueError(f"mask must have shape [B, T, H, W], got {list(mask.shape)}")
    if w is not None:
        _check_float("w", w, "[B, T]")
        if w.dim() != 2:
            raise ValueError(f"w must have shape [B, T], got {list(w.shape)}")
    if mask is None:  # neutral stand-ins: their terms are 0 and have weight 0
        mask = w.new_zeros(*w.shape, 1, 1)
        tv_weight = contrast_weight = 0.0
    elif w is None:
        w = mask.new_zeros(mask.shape[:2])
        unimodal_weight = 0.0
    mask, w = _autocast(mask, w)
    _check_like("w", w, mask, tuple(mask.shape[:2]), "mask")
    name = backends.resolve("st_regularizer", backend, mask.device, mask.dtype)
    args = (float(tv_weight), float(contrast_weight), float(unimodal_weight))
    if name == "reference":
        return reference.st_regularizer(mask, w, *args, sqrt=sqrt, tv_reduction=tv_reduction,
                                        unimodal_reduction=unimodal_reduction)
    return ops.call(ops.st_regularizer, mask, w, *args, sqrt, tv_reduction == "mean",
                              unimodal_reduction == "mean", name)


def _check_clip(x: Tensor, mask: Tensor) -> None:
    _check_float("x", x, "[B, T, C, H, W]")
    if x.dim() != 5:
        raise ValueError(f"x must have shape [B, T, C, H, W], got {list(x.shape)}")
    B, T, _, H, W = x.shape
    if min(T, H, W) < 1:
        raise ValueError(f"x must have T, H, W >= 1, got {list(x.shape)}")
    _check_like("mask", mask, x, (B, T, H, W))


def masked_frame_means(x: Tensor, mask: Tensor, *, backend: str | None = None) -> Tensor:
    """mean_{i,j}(mask_t ⊙ x_t): x ``[B, T, C, H, W]`` (per-frame NCHW or channels-last),
    mask ``[B, T, H, W]`` -> ``[B, T, C]``, in one pass over x (fused, forward and backward)."""
    _check_float("x", x, "[B, T, C, H, W]")
    _check_float("mask", mask, "[B, T, H, W]")
    x, mask = _autocast(x, mask)
    _check_clip(x, mask)
    name = backends.resolve("weighted_pool", backend, x.device, x.dtype)
    if name == "reference":
        return reference.masked_frame_means(x, mask)
    B, T, C, H, W = x.shape
    z = ops.call(ops.weighted_pool, x.reshape(B * T, C, H * W), mask.reshape(B * T, 1, H * W), name)
    return z.reshape(B, T, C)


def temporal_attention_pool(x: Tensor, mask: Tensor, scores: Tensor, *,
                            backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Spatio-temporal attention pooling (Meng et al.): w = softmax_T(scores),
    pooled = Σ_t w_t · mean_{i,j}(mask_t ⊙ x_t).

    Args:
        x: clip features ``[B, T, C, H, W]``; mask: spatial masks ``[B, T, H, W]``;
        scores: temporal scores ``[B, T]``.
    Returns ``(pooled [B, C], w [B, T])``. x is read once (the masked means are fused);
    the softmax and the sum over frames work on the small ``[B, T, C]`` means.
    """
    _check_float("x", x, "[B, T, C, H, W]")
    _check_float("scores", scores, "[B, T]")
    x, mask, scores = _autocast(x, mask, scores)
    _check_clip(x, mask)
    _check_like("scores", scores, x, tuple(x.shape[:2]))
    f = masked_frame_means(x, mask, backend=backend)
    w = torch.softmax(scores, dim=1)
    return torch.einsum("bt,btc->bc", w, f), w


# ============================================= interaction-aware pyramid attention
# the CUDA kernels take the levels' pointers by value (kMaxLevels, csrc/cuda/pyramid_attention.cuh)
_CUDA_MAX_LEVELS = 8


def pyramid_attention(
    maps: list[Tensor],
    score_weights: list[Tensor],
    score_bias: Tensor,
    eps: float = 1e-12,
    diversity_weight: float = 1.0,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Interaction-aware pyramid attention (our formulation of Du et al., ECCV 2018).

    Args:
        maps: one feature map per level, all ``[B, C_s, H_s, W_s]`` or all clips
            ``[B, T, C_s, H_s, W_s]``; each is average-pooled to the last map's H×W.
        score_weights: level s's scoring weights ``[C_s]``; score_bias ``[S]``.
        eps: lower bound of each score map's norm. diversity_weight: λ of the loss.
    Returns ``(out [B, Σ C_s], loss)``: the levels pooled under one fused softmax
    attention, and the PCA-guided + diversity loss (a 0-dim batch mean). The inputs are
    read once; the backward writes their gradients once.
    """
    if isinstance(score_weights, Tensor) or not isinstance(score_weights, (list, tuple)):
        raise TypeError("score_weights must be a list of [C_s] tensors, got "
                        f"{type(score_weights).__name__}")
    channels = []
    for s, w in enumerate(score_weights):
        _check_float(f"score_weights[{s}]", w, "[C_s]")
        if w.dim() != 1 or w.shape[0] < 1:
            raise ValueError(f"score_weights[{s}] must have shape [C_s], got {list(w.shape)}")
        channels.append(w.shape[0])
    if isinstance(maps, (list, tuple)) and len(maps) != len(channels):
        raise ValueError(f"score_weights must hold one [C_s] tensor per map ({len(maps)} maps), "
                         f"got {len(channels)}")
    reference.check_pyramid_maps(maps, channels)
    if score_bias is None:
        raise TypeError(f"score_bias must be a Tensor of shape [{len(channels)}], got None")
    S = len(channels)
    cast = _autocast(*maps, *score_weights, score_bias)
    maps, score_weights, score_bias = cast[:S], cast[S:2 * S], cast[2 * S]
    x = maps[0]
    for s, w in enumerate(score_weights):
        _check_like(f"score_weights[{s}]", w, x, (channels[s],), "maps[0]")
    _check_like("score_bias", score_bias, x, (len(channels),), "maps[0]")
    name = backends.resolve("pyramid_attention", backend, x.device, x.dtype)
    if name == "cuda" and S > _CUDA_MAX_LEVELS:
        if backends.requested(backend) == "cuda":
            raise backends.BackendUnavailableError(
                f"attnpool backend 'cuda' runs pyramid_attention with at most {_CUDA_MAX_LEVELS} "
                f"levels, got {S}; use 'triton' or 'auto'")
        name = "triton" if backends.why_not("pyramid_attention", "triton", x.device,
                                            x.dtype) is None else "reference"
    if name == "reference":
        return reference.pyramid_attention(maps, list(score_weights), score_bias, eps,
                                           diversity_weight)
    clips = [m if m.dim() == 5 else m.unsqueeze(1) for m in maps]
    out, loss, _, _ = ops.call(ops.pyramid_attention, clips, list(score_weights), score_bias,
                               float(eps), float(diversity_weight), name)
    return out, loss
