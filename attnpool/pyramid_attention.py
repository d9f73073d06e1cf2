"""Interaction-aware pyramid attention (our formulation of Du et al., ECCV 2018; docs/design.md,
"Pyramid attention"): the op ``attnpool::pyramid_attention`` (levels pooled to a common scale,
one fused softmax attention, the PCA-guided + diversity loss; with its backward op), its input
checks, its backend limits, the functional form and the module.

The op's reference is :func:`attnpool.reference.pyramid_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnpool import _ops, backends, reference

__all__ = ["PyramidAttention", "pyramid_attention"]

# The CUDA kernels take the levels' pointers by value, at most kMaxLevels of them
# (csrc/cuda/pyramid_attention.cuh).
CUDA_MAX_LEVELS = 8


def limits(backend: str, device: torch.device, dtype: torch.dtype, *, levels: int | None = None,
           **sizes) -> str | None:
    """The backend limits of pyramid_attention: None if ``backend`` can serve ``levels`` levels,
    else why not (see :func:`attnpool.backends.register_limits`)."""
    if backend == "cuda" and levels is not None and levels > CUDA_MAX_LEVELS:
        return f"cuda runs pyramid_attention with at most {CUDA_MAX_LEVELS} levels, got {levels}"
    return None


_ops.register_kernels("pyramid_attention", limits=limits)


def _triton_pyramid_attention(xs: list[Tensor], weights: list[Tensor], bias: Tensor, eps: float,
                      lam: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused pyramid attention: xs[s] [B, T, C_s, H_s, W_s], weights[s] [C_s], bias [S] ->
    out [B, Σ C_s], loss (0-dim, batch mean), and for the backward the pooled maps
    [B, Σ C_s, n] and the scores y [B, S, n] (opmath), n = T·H·W of the last level."""
    B, T = xs[0].shape[:2]
    Ctot, n = sum(w.shape[0] for w in weights), T * xs[-1].shape[-2] * xs[-1].shape[-1]
    if B == 0:  # the batch mean of nothing, as torch's
        stat = _ops.opmath(xs[0].dtype)
        return (xs[0].new_empty(0, Ctot), xs[0].new_full((), float("nan")),
                xs[0].new_empty(0, Ctot, n, dtype=stat), xs[0].new_empty(0, len(xs), n, dtype=stat))
    impl = backends.implementation("pyramid_attention", "triton")
    return impl.forward([x.contiguous() for x in xs], [w.contiguous() for w in weights],
                        bias.contiguous(), eps, lam)


pyramid_attention_op = _ops.Op("pyramid_attention", _triton_pyramid_attention)


@pyramid_attention_op.register_fake
def _(xs, weights, bias, eps, lam, backend):
    B, T = xs[0].shape[:2]
    Ctot, n = sum(w.shape[0] for w in weights), T * xs[-1].shape[-2] * xs[-1].shape[-1]
    stat = _ops.opmath(xs[0].dtype)
    return (xs[0].new_empty(B, Ctot), xs[0].new_empty(()), xs[0].new_empty(B, Ctot, n, dtype=stat),
            xs[0].new_empty(B, len(xs), n, dtype=stat))


def _triton_pyramid_attention_backward(grad_out: Tensor, grad_loss: Tensor, pooled: Tensor, y: Tensor,
                               weights: list[Tensor], eps: float, lam: float, sizes: list[int],
                               backend: str) -> list[Tensor]:
    """Gradients of pyramid_attention: [grad_xs..., grad_weights..., grad_bias] (S + S + 1
    tensors; sizes = [H_0, W_0, ..., H_{S-1}, W_{S-1}] of the inputs)."""
    impl = backends.implementation("pyramid_attention", "triton")
    grad_xs, grad_ws, grad_bias = impl.backward(
        grad_out.contiguous(), grad_loss, pooled.contiguous(), y.contiguous(),
        [w.contiguous() for w in weights], eps, lam, sizes)
    return list(grad_xs) + list(grad_ws) + [grad_bias]


pyramid_attention_backward = _ops.Op("pyramid_attention_backward", _triton_pyramid_attention_backward)


@pyramid_attention_backward.register_fake
def _(grad_out, grad_loss, pooled, y, weights, eps, lam, sizes, backend):
    B, S, n = y.shape
    T = n // (sizes[-2] * sizes[-1])
    return ([grad_out.new_empty(B, T, w.shape[0], sizes[2 * s], sizes[2 * s + 1])
             for s, w in enumerate(weights)]
            + [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
            + [grad_out.new_empty(S)])


def _pyramid_setup(ctx, inputs, output):
    xs, weights, bias, eps, lam, backend = inputs
    _, _, pooled, y = output
    ctx.save_for_backward(pooled, y, bias, *weights)
    ctx.sizes = [d for x in xs for d in x.shape[-2:]]
    ctx.params = (eps, lam, backend)
    ctx.mark_non_differentiable(pooled, y)
    ctx.set_materialize_grads(False)


def _pyramid_backward(ctx, grad_out, grad_loss, grad_pooled, grad_y):
    pooled, y, bias, *weights = ctx.saved_tensors
    S = len(weights)
    eps, lam, backend = ctx.params
    dtype = weights[0].dtype
    if grad_out is None:
        grad_out = pooled.new_zeros(pooled.shape[:2], dtype=dtype)
    if grad_loss is None:
        grad_loss = pooled.new_zeros((), dtype=dtype)
    if pooled.shape[0] == 0:
        B, n = 0, y.shape[-1]
        T = n // (ctx.sizes[-2] * ctx.sizes[-1])
        grad_xs = [grad_out.new_zeros(B, T, w.shape[0], ctx.sizes[2 * s], ctx.sizes[2 * s + 1])
                   for s, w in enumerate(weights)]
        return grad_xs, [torch.zeros_like(w) for w in weights], grad_out.new_zeros(S), None, None, None
    if _ops.legacy_batched((grad_out, grad_loss)):
        grads = _pyramid_backward_by_autograd(grad_out, grad_loss, pooled, bias, weights, eps,
                                              lam, ctx.sizes)
    else:
        grads = _ops.backward_op(pyramid_attention_backward)(
            grad_out, grad_loss, pooled, y, weights, eps, lam, ctx.sizes, backend)
    return grads[:S], grads[S:2 * S], grads[2 * S], None, None, None


def _pyramid_backward_by_autograd(grad_out, grad_loss, pooled, bias, weights, eps, lam, sizes):
    """The backward through torch's autograd of the reference, from the pooled maps, for the
    legacy vmap's batched gradients (autograd.grad(is_grads_batched=True), as gradcheck's
    batched test uses): its fallback cannot batch an op with tensor-list arguments."""
    B, _, n = pooled.shape
    Ho, Wo = sizes[-2:]
    T = n // (Ho * Wo)
    with torch.enable_grad():
        levels = pooled.detach().split([w.shape[0] for w in weights], dim=1)
        maps = [p.unsqueeze(2).requires_grad_() for p in levels]  # [B, C_s, 1, n]: R = id
        params = [w.detach().to(pooled.dtype).requires_grad_() for w in weights]
        b = bias.detach().to(pooled.dtype).requires_grad_()
        out, loss = reference.pyramid_attention(maps, params, b, eps, lam)
        grads = torch.autograd.grad((out, loss), maps + params + [b], (grad_out, grad_loss))
        grad_xs = []
        for s, g in enumerate(grads[:len(weights)]):  # unpool: the adjoint of R
            C = g.shape[1]
            x = pooled.new_zeros(B * T, C, sizes[2 * s], sizes[2 * s + 1], requires_grad=True)
            r = torch.nn.functional.adaptive_avg_pool2d(x, (Ho, Wo))
            g = g.reshape(B, C, T, Ho, Wo).transpose(1, 2).reshape(B * T, C, Ho, Wo)
            (gx,) = torch.autograd.grad(r, x, g)
            grad_xs.append(gx.reshape(B, T, C, *gx.shape[-2:]))
    dtype = weights[0].dtype
    return [g.to(dtype) for g in grad_xs + list(grads[len(weights):])]


_ops.register_autograd(pyramid_attention_op, _pyramid_backward, _pyramid_setup)
_ops.register_backward_op(pyramid_attention_backward)


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
        _ops.check_float(f"score_weights[{s}]", w, "[C_s]")
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
    cast = _ops.autocast(*maps, *score_weights, score_bias)
    maps, score_weights, score_bias = cast[:S], cast[S:2 * S], cast[2 * S]
    x = maps[0]
    for s, w in enumerate(score_weights):
        _ops.check_like(f"score_weights[{s}]", w, x, (channels[s],), "maps[0]")
    _ops.check_like("score_bias", score_bias, x, (len(channels),), "maps[0]")
    name = backends.resolve("pyramid_attention", backend, x.device, x.dtype, levels=S)
    if name == "reference":
        return reference.pyramid_attention(maps, list(score_weights), score_bias, eps,
                                           diversity_weight)
    clips = [m if m.dim() == 5 else m.unsqueeze(1) for m in maps]
    out, loss, _, _ = _ops.call(pyramid_attention_op, clips, list(score_weights), score_bias,
                               float(eps), float(diversity_weight), name)
    return out, loss


class PyramidAttention(_ops.NotScriptable, reference.PyramidAttention):
    """Interaction-aware pyramid attention (our formulation of Du et al., ECCV 2018) with
    fused kernels.

    Each level's map is average-pooled to the last map's H×W (R), scored per position
    (``y_s = R(X_s)·w_s + b_s``); one softmax over the summed scores pools every level, and
    the outputs are concatenated. The loss rewards the variance of each level's centred map
    along its unit score map (PCA guidance) and penalises overlap between levels' score maps.

    Args:
        in_channels: C_s of each level, e.g. ``[256, 512, 1024, 2048]``.
        eps: lower bound of each score map's norm. diversity_weight: λ of the overlap term.
        backend: None (context / ``ATTNPOOL_BACKEND`` / auto), "auto", "reference", "cpp",
            "cuda" or "triton".

    ``forward(maps, return_loss=False)``: maps ``[B, C_s, H_s, W_s]`` or clips
    ``[B, T, C_s, H_s, W_s]`` -> ``out [B, Σ C_s]`` (and the 0-dim loss with
    ``return_loss=True``). Parameters ``score_weights`` (level s: ``[C_s]``) and
    ``score_bias [S]``, as :class:`attnpool.reference.PyramidAttention`.
    """

    def __init__(self, in_channels: list[int], eps: float = 1e-12, diversity_weight: float = 1.0,
                 *, backend: str | None = None, **kwargs) -> None:
        super().__init__(in_channels, eps, diversity_weight, **kwargs)
        self.backend = backend

    def forward(self, maps: list[Tensor], return_loss: bool = False):
        reference.check_pyramid_maps(maps, self.in_channels)
        out, loss = pyramid_attention(
            maps, list(self.score_weights), self.score_bias, self.eps, self.diversity_weight,
            backend=self.backend)
        return (out, loss) if return_loss else out
