"""The weighted spatial pool: the op ``attnpool::weighted_pool``, x ``[B, C, n]`` pooled under P
given maps h ``[B, P, n]`` (the primitive under the pose variant of attentional pooling and the
masked frame means of spatio-temporal attention), its backward op, and
:func:`masked_frame_means`.

Its kernels share attentional pooling's (``kernels/attentional_pooling.py``,
``csrc/cpu/attentional_pooling.cpp``, ``csrc/cuda/attentional_pooling.cu``): the same
position-tiled reduction, with the maps given instead of computed. The op's reference is
:func:`attnpool.reference.weighted_pool`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnpool import _ops, backends, reference

__all__ = ["masked_frame_means"]

# No backend limits beyond the backends' own (device, Triton interpreter dtypes).
_ops.register_kernels("weighted_pool", triton_module="attentional_pooling")


def _triton_weighted_pool(x: Tensor, h: Tensor, backend: str) -> Tensor:
    """x [B, C, n], h [B, P, n] -> z [B, P, C] = (1/n) Σ_i h[:, :, i] x[:, :, i]."""
    B, C, _ = x.shape
    if B == 0:
        return x.new_empty(0, h.shape[1], C)
    impl = backends.implementation("weighted_pool", "triton")
    return impl.forward(_ops.dense_bcn(x), h.contiguous())


weighted_pool_op = _ops.Op("weighted_pool", _triton_weighted_pool)


@weighted_pool_op.register_fake
def _(x, h, backend):
    return x.new_empty(x.shape[0], h.shape[1], x.shape[1])


def _triton_weighted_pool_backward(grad_z: Tensor, x: Tensor, h: Tensor, backend: str
                           ) -> tuple[Tensor, Tensor]:
    """Gradients of weighted_pool w.r.t. x (x's layout) and h."""
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(h)
    impl = backends.implementation("weighted_pool", "triton")
    return impl.backward(grad_z.contiguous(), _ops.dense_bcn(x), h.contiguous())


weighted_pool_backward = _ops.Op("weighted_pool_backward", _triton_weighted_pool_backward)


@weighted_pool_backward.register_fake
def _(grad_z, x, h, backend):
    return torch.empty_like(_ops.dense_bcn(x)), torch.empty_like(h, memory_format=torch.contiguous_format)


def _weighted_pool_setup(ctx, inputs, output):
    x, h, backend = inputs
    ctx.save_for_backward(x, h)
    ctx.backend = backend


def _weighted_pool_backward(ctx, grad_z):
    x, h = ctx.saved_tensors
    grad_x, grad_h = _ops.backward_op(weighted_pool_backward)(grad_z, x, h, ctx.backend)
    return grad_x, grad_h, None


_ops.register_autograd(weighted_pool_op, _weighted_pool_backward, _weighted_pool_setup)
_ops.register_backward_op(weighted_pool_backward)


def check_clip(x: Tensor, mask: Tensor) -> None:
    _ops.check_float("x", x, "[B, T, C, H, W]")
    if x.dim() != 5:
        raise ValueError(f"x must have shape [B, T, C, H, W], got {list(x.shape)}")
    B, T, _, H, W = x.shape
    if T < 1 or H < 1 or W < 1:  # not min(): under torch.export it would order the sizes
        raise ValueError(f"x must have T, H, W >= 1, got {list(x.shape)}")
    _ops.check_like("mask", mask, x, (B, T, H, W))


def masked_frame_means(x: Tensor, mask: Tensor, *, backend: str | None = None) -> Tensor:
    """mean_{i,j}(mask_t ⊙ x_t): x ``[B, T, C, H, W]`` (per-frame NCHW or channels-last),
    mask ``[B, T, H, W]`` -> ``[B, T, C]``, in one pass over x (fused, forward and backward)."""
    _ops.check_float("x", x, "[B, T, C, H, W]")
    _ops.check_float("mask", mask, "[B, T, H, W]")
    x, mask = _ops.autocast(x, mask)
    check_clip(x, mask)
    name = backends.resolve("weighted_pool", backend, x.device, x.dtype)
    if name == "reference":
        return reference.masked_frame_means(x, mask)
    B, T, C, H, W = x.shape
    z = _ops.call(weighted_pool_op, x.reshape(B * T, C, H * W), mask.reshape(B * T, 1, H * W), name)
    return z.reshape(B, T, C)
