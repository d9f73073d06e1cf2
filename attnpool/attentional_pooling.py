"""Attentional pooling (Girdhar & Ramanan, NeurIPS 2017; docs/design.md, "Attentional
pooling"): the op ``attnpool::attentional_pooling`` (the factored core: bottom-up maps and the
features pooled under them, with its backward op), the input checks, the functional forms
(plain and pose-regularised; the pose variant pools through :mod:`attnpool.weighted_pool`) and
the module.

The op's reference is :func:`attnpool.reference.attentional_pooling_op`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnpool import _ops, backends, reference
from attnpool.weighted_pool import weighted_pool_op

__all__ = ["AttentionalPooling", "attentional_pooling", "pose_attentional_pooling"]

# No backend limits beyond the backends' own (device, Triton interpreter dtypes).
_ops.register_kernels("attentional_pooling")


def _triton_attentional_pooling(x: Tensor, wb: Tensor, bb: Tensor, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Factored core of attentional pooling: x [B, C, n], wb [P, C], bb [P] ->
    z [B, P, C] = (1/n) Σ_i h[:, :, i] x[:, :, i], the bottom-up maps h [B, P, n] = wb x + bb,
    and their means over positions m [B, P] (opmath: the logits' bias term takes its
    gradient through m unrounded, not as n equal roundings in h's dtype)."""
    B, C, n = x.shape
    P = wb.shape[0]
    if B == 0:
        return x.new_empty(0, P, C), x.new_empty(0, P, n), x.new_empty(0, P, dtype=_ops.opmath(x.dtype))
    impl = backends.implementation("attentional_pooling", "triton")
    z, h = impl.forward(_ops.dense_bcn(x), wb.contiguous(), bb.contiguous())
    return z, h, h.to(_ops.opmath(x.dtype)).mean(-1)


attentional_pooling_op = _ops.Op("attentional_pooling", _triton_attentional_pooling)


@attentional_pooling_op.register_fake
def _(x, wb, bb, backend):
    B, C, n = x.shape
    P = wb.shape[0]
    return x.new_empty(B, P, C), x.new_empty(B, P, n), x.new_empty(B, P, dtype=_ops.opmath(x.dtype))


def _triton_attentional_pooling_backward(grad_z: Tensor, grad_h: Tensor, x: Tensor, h: Tensor, wb: Tensor,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attentional_pooling w.r.t. x (x's layout), wb and bb; grad_h may be opmath."""
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(wb), wb.new_zeros(wb.shape[0])
    impl = backends.implementation("attentional_pooling", "triton")
    return impl.backward(grad_z.contiguous(), grad_h.contiguous(), _ops.dense_bcn(x), h.contiguous(),
                         wb.contiguous())


attentional_pooling_backward = _ops.Op("attentional_pooling_backward", _triton_attentional_pooling_backward)


@attentional_pooling_backward.register_fake
def _(grad_z, grad_h, x, h, wb, backend):
    return torch.empty_like(_ops.dense_bcn(x)), torch.empty_like(wb), wb.new_empty(wb.shape[0])


def _attentional_pooling_setup(ctx, inputs, output):
    x, wb, _, backend = inputs
    ctx.save_for_backward(x, output[1], wb)
    ctx.backend = backend


def _attentional_pooling_backward(ctx, grad_z, grad_h, grad_m):
    x, h, wb = ctx.saved_tensors
    if grad_z is None:
        grad_z = x.new_zeros(x.shape[0], wb.shape[0], x.shape[1])
    # the kernels read grad_h in opmath: the mean's gradient joins it unrounded
    grad_h = torch.zeros_like(h, dtype=_ops.opmath(x.dtype)) if grad_h is None else \
        grad_h.to(_ops.opmath(x.dtype))
    if grad_m is not None:
        grad_h = grad_h + grad_m[..., None] / x.shape[-1]
    grad_x, grad_wb, grad_bb = _ops.backward_op(attentional_pooling_backward)(
        grad_z, grad_h, x, h, wb, ctx.backend)
    return grad_x, grad_wb, grad_bb, None


_ops.register_autograd(attentional_pooling_op, _attentional_pooling_backward, _attentional_pooling_setup)
_ops.register_backward_op(attentional_pooling_backward)


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
    _ops.check_float("weight_bottom_up", weight_bottom_up, "[P, C]")
    if weight_bottom_up.dim() != 2:
        raise ValueError(f"weight_bottom_up must have shape [P, C], "
                         f"got {list(weight_bottom_up.shape)}")
    P, C = weight_bottom_up.shape
    _check_attentional(x, P, C, weight_top_down, bias_top_down)
    _ops.check_like("weight_bottom_up", weight_bottom_up, x, (P, C))
    _ops.check_like("bias_bottom_up", bias_bottom_up, x, (P,))

    x, weight_bottom_up, bias_bottom_up, weight_top_down, bias_top_down = _ops.autocast(
        x, weight_bottom_up, bias_bottom_up, weight_top_down, bias_top_down)
    name = backends.resolve("attentional_pooling", backend, x.device, x.dtype)
    if name == "reference":
        return reference.attentional_pooling(x, weight_bottom_up, bias_bottom_up,
                                             weight_top_down, bias_top_down)
    H, W = x.shape[-2:]
    feats = x.reshape(-1, C, H * W)  # a view for NCHW and channels-last alike
    bb = bias_bottom_up if bias_bottom_up is not None else x.new_zeros(P)
    z, h, m = _ops.call(attentional_pooling_op, feats, weight_bottom_up, bb, name)
    return _factored_logits(x, z, h, m, weight_top_down, bias_top_down)


def _check_attentional(x: Tensor, P: int, C: int, weight_top_down: Tensor,
                       bias_top_down: Tensor | None) -> int:
    """Checks the feature map x ``[B, (T,) C, H, W]`` and the top-down parameters
    ``[P, K, C]``, ``[P, K]``; returns K."""
    _ops.check_float("x", x, "[B, C, H, W] or [B, T, C, H, W]")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must have shape [B, C, H, W] or [B, T, C, H, W], got {list(x.shape)}")
    if x.shape[-3] != C:
        lead = "[B, T, " if x.dim() == 5 else "[B, "
        raise ValueError(f"x must have shape {lead}{C}, H, W] (the channels the weights "
                         f"expect), got {list(x.shape)}")
    if x.shape[-2] * x.shape[-1] < 1:
        raise ValueError(f"x must have H, W >= 1, got {list(x.shape)}")
    _ops.check_float("weight_top_down", weight_top_down, "[P, K, C]")
    if weight_top_down.dim() != 3:
        raise ValueError(f"weight_top_down must have shape [P={P}, K, C={C}], "
                         f"got {list(weight_top_down.shape)}")
    K = weight_top_down.shape[1]
    _ops.check_like("weight_top_down", weight_top_down, x, (P, K, C))
    _ops.check_like("bias_top_down", bias_top_down, x, (P, K))
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
    _ops.check_float("weight_top_down", weight_top_down, "[P, K, C]")
    if weight_top_down.dim() != 3:
        raise ValueError(f"weight_top_down must have shape [P, K, C], "
                         f"got {list(weight_top_down.shape)}")
    P, _, C = weight_top_down.shape
    _check_attentional(x, P, C, weight_top_down, bias_top_down)
    _ops.check_float("weight_bottom_up", weight_bottom_up, "[P, D]")
    if weight_bottom_up.dim() != 2 or weight_bottom_up.shape[0] != P:
        raise ValueError(f"weight_bottom_up must have shape [P={P}, D], "
                         f"got {list(weight_bottom_up.shape)}")
    D = weight_bottom_up.shape[1]
    _ops.check_float("q", q, "[B, (T,) D, H, W]")
    if q.shape != (*x.shape[:-3], D, *x.shape[-2:]):
        raise ValueError(f"q must have shape {[*x.shape[:-3], D, *x.shape[-2:]]} (x's batch, "
                         f"frames and H×W with D={D} channels), got {list(q.shape)}")
    _ops.check_like("q", q, x, tuple(q.shape))
    _ops.check_like("weight_bottom_up", weight_bottom_up, x, (P, D))
    _ops.check_like("bias_bottom_up", bias_bottom_up, x, (P,))
    H, W = x.shape[-2:]
    feats = x.reshape(-1, C, H * W)
    h = torch.einsum("pd,bdn->bpn", weight_bottom_up, q.reshape(-1, D, H * W))
    if bias_bottom_up is not None:
        h = h + bias_bottom_up[:, None]
    name = backends.resolve("weighted_pool", backend, x.device, x.dtype)
    z = reference.weighted_pool(feats, h) if name == "reference" else \
        _ops.call(weighted_pool_op, feats, h, name)
    return _factored_logits(x, z, h, h.mean(-1), weight_top_down, bias_top_down)


class AttentionalPooling(_ops.NotScriptable, reference.AttentionalPooling):
    """Rank-P attentional pooling (Girdhar & Ramanan, NeurIPS 2017) with fused kernels.

    A drop-in for ``AdaptiveAvgPool2d(1) + flatten + Linear(C, K)`` on ``[B, C, H, W]``
    (NCHW or channels-last); clips ``[B, T, C, H, W]`` average the per-frame logits.
    ``score_k = Σ_p mean_i h[p,i]·t[p,k,i]`` with bottom-up maps ``h`` (class-agnostic)
    and top-down maps ``t`` (one per class), computed in the factored form that never
    builds the ``[H·W, K]`` top-down maps.

    Args:
        in_channels: C. num_classes: K. rank: P. bias: bottom-up and top-down biases.
        pose_keypoints: J enables the pose-regularised variant: a 1×1 conv + ReLU of
            ``pose_channels`` "pose pre-logits" feeds the bottom-up maps and a keypoint
            heatmap head (``forward(..., return_heatmaps=True)``, :meth:`pose_loss`).
            Its pooling of x under those maps runs in the fused ``weighted_pool`` kernel.
            ``pose_init="official"``: the official pose layer init, N(0, 0.001).
        top_down_dropout: dropout probability of the features feeding the top-down maps, in
            training (the official graph's: 0.8, i.e. keep 0.2); then the pooling runs in the
            fused ``weighted_pool`` kernel.
        backend: None (context / ``ATTNPOOL_BACKEND`` / auto), "auto", "reference", "cpp",
            "cuda" or "triton".

    Parameters ``weight_bottom_up [P, C]``, ``bias_bottom_up [P]``, ``weight_top_down [P, K, C]``,
    ``bias_top_down [P, K]`` match :class:`attnpool.reference.AttentionalPooling`.
    """

    def __init__(self, in_channels: int, num_classes: int, *, backend: str | None = None, **kwargs):
        super().__init__(in_channels, num_classes, **kwargs)
        self.backend = backend

    def _pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return attentional_pooling(
            x, self.weight_bottom_up, self.bias_bottom_up, self.weight_top_down,
            self.bias_top_down, backend=self.backend)

    def _pose_pool(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        return pose_attentional_pooling(
            x, q, self.weight_bottom_up, self.bias_bottom_up, self.weight_top_down,
            self.bias_top_down, backend=self.backend)
