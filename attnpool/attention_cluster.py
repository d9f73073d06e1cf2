"""Attention clusters (Long et al., CVPR 2018; docs/design.md, "Attention clusters"): the op
``attnpool::attention_cluster`` (fused softmax pooling + shift + L2 norm, with its backward
ops), its input checks, its backend limits, the functional form and the modules.

The op takes the linear scoring layer itself for "fc1" (the cpp kernels fuse it) and the
scores otherwise; its reference is :func:`attnpool.reference.attention_cluster_op`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnpool import _ops, backends, reference

__all__ = ["AttentionCluster", "MultimodalAttentionClusters", "attention_cluster"]

# No backend limits beyond the backends' own (device, Triton interpreter dtypes).
_ops.register_kernels("attention_cluster")


def _fc1_fused(weight: Tensor | None, backend: str) -> bool:
    """Whether attention_cluster runs the CPU kernels with the fc1 scoring layer fused (the cpp
    op does whenever it is given the weight; csrc/attention_cluster.cpp)."""
    return weight is not None and backend == "cpp"


def check_lengths(lengths: Tensor, L: int) -> None:
    # Value checks cost no sync on the CPU; on a GPU they run as a device-side assert.
    if lengths.device.type == "cpu":
        bad = (lengths < 1) | (lengths > L)
        if bool(bad.any()):
            raise ValueError(f"lengths must lie in [1, L={L}], got {lengths.tolist()}")
    else:
        torch._assert_async(((lengths >= 1) & (lengths <= L)).all(), "lengths must lie in [1, L]")


def norm_eps(eps: float, eps_placement: str) -> tuple[float, float]:
    """The kernels' (eps, eps_sqrt) of the cluster norm max(sqrt(‖u‖² + eps_sqrt), eps):
    ``"clamp"`` is max(‖u‖, eps) (torch's clamp_min), ``"sqrt"`` is sqrt(‖u‖² + eps)
    (PaddlePaddle's l2_normalize)."""
    if eps_placement == "clamp":
        return float(eps), 0.0
    if eps_placement == "sqrt":
        return 0.0, float(eps)
    raise ValueError(f"eps_placement must be 'clamp' or 'sqrt', got {eps_placement!r}")


def _int64(lengths: Tensor | None) -> Tensor | None:
    return None if lengths is None else lengths.to(torch.int64).contiguous()


def _triton_forward(
    x: Tensor,
    scores: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    lengths: Tensor | None,
    alpha: Tensor,
    beta: Tensor,
    shift: bool,
    eps: float,
    eps_sqrt: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The op on the Triton kernels (the compiled ones: csrc/attention_cluster.cpp, the same
    steps): x [B, L, F] and either scores [B, L, N], or the linear scoring layer weight [N, F]
    (+ bias [N], which the softmax cancels) -> out [B, N*F], attn [B, N, L], norm [B, N].
    Taking the scoring layer in the op lets its backward add grad_scores·weight into grad_x
    in place and skip an autograd node. The norm is max(sqrt(‖u‖² + eps_sqrt), eps) (see
    :func:`norm_eps`)."""
    B, L, F = x.shape
    N = alpha.shape[0]
    if lengths is not None:
        check_lengths(lengths, L)
    lengths = _int64(lengths)
    stat = _ops.opmath(x.dtype)
    if B == 0:
        return (x.new_empty(0, N * F), x.new_empty(0, N, L, dtype=stat),
                x.new_empty(0, N, dtype=stat))
    # The kernels take the scores in opmath: rounded to half / bfloat16 they would move every
    # softmax weight by about that rounding times |score| (fp16 outputs of the GPU kernels
    # were 3x further from float64 than the fp16 reference, 50x further than the fused cpp
    # kernels, at B=4, L=300, F=2048, N=64).
    if weight is not None:  # the bias shifts every frame's score alike: the softmax cancels it
        scores = torch.nn.functional.linear(x.to(stat), weight.to(stat))
    impl = backends.implementation("attention_cluster", "triton")
    return impl.forward(x.contiguous(), scores.to(stat).contiguous(), lengths, alpha.contiguous(),
                        beta.contiguous(), shift, eps, eps_sqrt)


# Fused softmax pooling + shift + L2 norm of attention clusters (see _triton_forward).
attention_cluster_op = _ops.Op("attention_cluster", _triton_forward)


@attention_cluster_op.register_fake
def _(x, scores, weight, bias, lengths, alpha, beta, shift, eps, eps_sqrt, backend):
    B, L, F = x.shape
    N = alpha.shape[0]
    stat = _ops.opmath(x.dtype)
    return (x.new_empty(B, N * F), x.new_empty(B, N, L, dtype=stat), x.new_empty(B, N, dtype=stat))


def _triton_backward(
    grad_out: Tensor,
    x: Tensor,
    attn: Tensor,
    norm: Tensor,
    alpha: Tensor,
    beta: Tensor,
    lengths: Tensor | None,
    shift: bool,
    eps: float,
    eps_sqrt: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of attention_cluster w.r.t. x, scores, alpha, beta (recomputes v from attn, x).
    Frames past ``lengths`` are never read (NaN there reaches no gradient); their gradient
    is 0."""
    if x.shape[0] == 0:
        B, L, F = x.shape
        return x.new_zeros(x.shape), x.new_zeros(B, L, attn.shape[1]), alpha.new_zeros(
            alpha.shape), beta.new_zeros(beta.shape)
    impl = backends.implementation("attention_cluster", "triton")
    return impl.backward(grad_out.contiguous(), x.contiguous(), attn.contiguous(),
                         norm.contiguous(), alpha.contiguous(), beta.contiguous(),
                         _int64(lengths), shift, eps, eps_sqrt)


attention_cluster_backward = _ops.Op("attention_cluster_backward", _triton_backward)


@attention_cluster_backward.register_fake
def _(grad_out, x, attn, norm, alpha, beta, lengths, shift, eps, eps_sqrt, backend):
    B, L, _ = x.shape
    return (torch.empty_like(x), x.new_empty(B, L, attn.shape[1]), torch.empty_like(alpha),
            torch.empty_like(beta))


# Gradients of attention_cluster with the fused fc1 scoring layer (cpp only) w.r.t. x, weight,
# alpha, beta; its grad_attn (optional) is the gradient w.r.t. the returned attention.
attention_cluster_fc1_backward = _ops.Op("attention_cluster_fc1_backward", None)


@attention_cluster_fc1_backward.register_fake
def _(grad_out, grad_attn, x, weight, out, attn, norm, alpha, beta, lengths, shift, eps,
      eps_sqrt, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(alpha), torch.empty_like(beta))


def _cluster_setup(ctx, inputs, output):
    x, _, weight, bias, lengths, alpha, beta, shift, eps, eps_sqrt, backend = inputs
    out, attn, norm = output
    ctx.fc1_fused = _fc1_fused(weight, backend)
    # the fused fc1 backward takes du from the output rather than recomputing v (an in-place
    # change of the output then raises autograd's error, as after torch.sigmoid); without the
    # shift du is grad_out itself
    ctx.save_for_backward(x, attn, norm, alpha, beta, weight, lengths,
                          out if ctx.fc1_fused and shift else None)
    ctx.shift, ctx.eps, ctx.eps_sqrt, ctx.backend = shift, eps, eps_sqrt, backend
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(norm)
    ctx.set_materialize_grads(False)  # an unused attention output costs nothing


def _cluster_backward(ctx, grad_out, grad_attn, grad_norm):
    x, attn, norm, alpha, beta, weight, lengths, out = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros(x.shape[0], attn.shape[1] * x.shape[2])
    if ctx.fc1_fused:
        grad_x, grad_weight, grad_alpha, grad_beta = _ops.backward_op(attention_cluster_fc1_backward)(
            grad_out, grad_attn, x, weight, out, attn, norm, alpha, beta, lengths, ctx.shift,
            ctx.eps, ctx.eps_sqrt, ctx.backend)
        grad_bias = weight.new_zeros(weight.shape[0]) if ctx.has_bias else None
        if not ctx.shift:  # alpha and beta are unused without the shift, as in the reference
            grad_alpha = grad_beta = None
        return (grad_x, None, grad_weight, grad_bias, None, grad_alpha, grad_beta, None, None,
                None, None)
    grad_x, grad_scores, grad_alpha, grad_beta = _ops.backward_op(attention_cluster_backward)(
        grad_out, x, attn, norm, alpha, beta, lengths, ctx.shift, ctx.eps, ctx.eps_sqrt,
        ctx.backend
    )
    if not ctx.shift:
        grad_alpha = grad_beta = None
    if grad_attn is not None:  # the caller also used the returned attention
        g = attn * (grad_attn - (attn * grad_attn).sum(-1, keepdim=True))
        grad_scores = grad_scores + g.transpose(1, 2).to(grad_scores.dtype)
    if weight is None:
        return (grad_x, grad_scores, None, None, None, grad_alpha, grad_beta, None, None, None,
                None)
    # the scoring layer: grad_x += grad_scores weight (into the kernel's fresh grad_x),
    # grad_weight = grad_scores^T x; the bias gradient is exactly 0
    F, N = x.shape[-1], weight.shape[0]
    gs = grad_scores.reshape(-1, N)
    grad_x.view(-1, F).addmm_(gs, weight)
    x = reference.zero_padded_frames(x, lengths)  # gs = 0 there: no 0 * NaN from padding
    grad_weight = gs.t() @ x.reshape(-1, F)
    grad_bias = weight.new_zeros(N) if ctx.has_bias else None
    return (grad_x, None, grad_weight, grad_bias, None, grad_alpha, grad_beta, None, None, None,
            None)


_ops.register_autograd(attention_cluster_op, _cluster_backward, _cluster_setup)
_ops.register_backward_op(attention_cluster_backward)
_ops.register_backward_op(attention_cluster_fc1_backward)


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
    _ops.check_float("x", x, "[B, L, F]")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, L, F], got {list(x.shape)}")
    B, L, Fx = x.shape
    if L < 1 or Fx < 1:
        raise ValueError(f"x must have L >= 1 frames and F >= 1 features, got {list(x.shape)}")
    if attention not in ("fc1", "fc2", "average"):
        raise ValueError(f"attention must be 'fc1', 'fc2' or 'average', got {attention!r}")
    eps_clamp, eps_sqrt = norm_eps(eps, eps_placement)
    _ops.check_float("alpha", alpha, "[N]")
    if alpha.dim() != 1:
        raise ValueError(f"alpha must have shape [N], got {list(alpha.shape)}")
    N = alpha.shape[0]
    _ops.check_like("alpha", alpha, x, (N,))
    _ops.check_like("beta", beta, x, (N,))
    key_weight = weight1 if attention == "fc2" else weight
    if isinstance(key_weight, Tensor) and key_weight.dim() == 2 and key_weight.shape[1] != Fx:
        raise ValueError(f"x must have shape [B, L, {key_weight.shape[1]}] (the features the "
                         f"weights expect), got {list(x.shape)}")
    if attention == "fc2":
        if weight1 is None:
            raise ValueError("attention='fc2' needs weight1 [H, F] and bias1 [H]")
        H = weight1.shape[0] if weight1.dim() == 2 else -1
        _ops.check_like("weight1", weight1, x, (H, Fx))
        _ops.check_like("bias1", bias1, x, (H,))
        _ops.check_like("weight", weight, x, (N, H))
    elif attention == "fc1":
        if weight is None:
            raise ValueError(f"attention='fc1' needs weight [N={N}, F={Fx}]")
        _ops.check_like("weight", weight, x, (N, Fx))
    if attention != "average":
        _ops.check_like("bias", bias, x, (N,))
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.is_floating_point() or lengths.is_complex() \
                or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer Tensor of shape [B={B}]")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape [B={B}], got {list(lengths.shape)}")
        if lengths.device != x.device and lengths.device.type != "cpu":
            raise ValueError(f"lengths is on {lengths.device} but x is on {x.device}")

    x, weight, bias, alpha, beta, weight1, bias1 = _ops.autocast(
        x, weight, bias, alpha, beta, weight1, bias1)
    name = backends.resolve("attention_cluster", backend, x.device, x.dtype)
    if lengths is not None and (name == "reference" or lengths.device != x.device):
        # kernel backends check inside the op; here the check is free (CPU lengths)
        if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
            check_lengths(lengths, L)
        lengths = lengths.to(x.device, non_blocking=True)
    if name == "reference":
        return reference.attention_cluster(
            x, weight, bias, alpha, beta, lengths, attention=attention,
            weight1=weight1, bias1=bias1, shift=shift, eps=eps, eps_placement=eps_placement)

    if attention == "fc1":  # the op takes the scoring layer itself (see attention_cluster_op)
        out, attn, _ = _ops.call(attention_cluster_op, x, None, weight, bias, lengths, alpha, beta,
                                shift, eps_clamp, eps_sqrt, name)
        return out, attn.to(x.dtype)
    if attention == "average":
        scores = x.new_zeros(B, L, N)
    else:  # padded frames must not reach the scoring layers' gradients as 0 * NaN
        keys = reference.zero_padded_frames(x, lengths)
        scores = F.linear(torch.tanh(F.linear(keys, weight1, bias1)), weight, bias)
    out, attn, _ = _ops.call(attention_cluster_op, x, scores, None, None, lengths, alpha, beta, shift,
                            eps_clamp, eps_sqrt, name)
    return out, attn.to(x.dtype)


class AttentionCluster(_ops.NotScriptable, reference.AttentionCluster):
    """Attention clusters (Long et al., CVPR 2018) with fused kernels.

    N attention units each softmax-pool the frames of ``x [B, L, F]``; with
    ``shift=True`` each unit's result is shifted and L2-normalised,
    ``o_n = (α_n·v_n + β_n) / (√N·‖α_n·v_n + β_n‖)``. Output ``[B, N·F]`` (unit-major).

    Args:
        in_features: F. num_units: N.
        attention: "fc1" (linear scores), "fc2" (shared tanh hidden layer of
            ``hidden_features`` units) or "average".
        shift: the shifting operation + L2 norm.
        eps, eps_placement: the norm is max(‖u‖, eps) with ``"clamp"`` (default) and
            sqrt(‖u‖² + eps) with ``"sqrt"`` (PaddlePaddle's); every backend computes both.
        backend: None (context / ``ATTNPOOL_BACKEND`` / auto), "auto", "reference",
            "cpp", "cuda" or "triton".

    Parameters ``weight``, ``bias``, ``alpha``, ``beta`` (and ``weight1``, ``bias1`` for
    fc2) match :class:`attnpool.reference.AttentionCluster`; :meth:`from_official` loads the
    official checkpoints (first author's PyTorch code, PaddlePaddle, MindSpore).
    """

    def __init__(self, in_features: int, num_units: int, *, backend: str | None = None, **kwargs):
        super().__init__(in_features, num_units, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, lengths: Tensor | None = None, return_attention: bool = False):
        """x ``[B, L, F]``, lengths int ``[B]`` (optional) -> ``[B, N·F]``
        (and attention ``[B, N, L]`` with ``return_attention=True``)."""
        out, attn = attention_cluster(
            x, self.weight, self.bias, self.alpha, self.beta, lengths,
            attention=self.attention, weight1=self.weight1, bias1=self.bias1,
            shift=self.shift, eps=self.eps, eps_placement=self.eps_placement,
            backend=self.backend,
        )
        return (out, attn) if return_attention else out


class MultimodalAttentionClusters(_ops.NotScriptable, reference.MultimodalAttentionClusters):
    """One fused :class:`AttentionCluster` per modality, outputs concatenated in the
    order of ``modalities``: ``MultimodalAttentionClusters({"rgb": (2048, 64), "audio": (128, 32)})``."""

    cluster_class = AttentionCluster
