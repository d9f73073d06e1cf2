"""Model surgery: put attnpool's fused modules into models you already have.

``attnpool.swap(model, backend=None)`` turns, in place, every attnpool reference module
inside ``model`` (and every module registered as a twin) into its fused module: the
object stays the same (same parameters, buffers, hooks, device, dtype, training mode);
only its class changes, to the fused subclass, and its ``backend`` is set.

Registering your own module as a twin (:func:`register`): the fused class must be a
subclass of yours that keeps your attributes and parameter names and adds only a
``backend`` attribute (None = the context / ``ATTNPOOL_BACKEND`` / auto); that is how
attnpool's own fused modules extend their reference twins.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from attnpool import backends, losses, reference
from attnpool import nn as fused

__all__ = ["attentional_head_from_linear", "register", "swap"]

# reference (or user) class -> fused class
TWINS: dict[type, type] = {
    reference.AttentionCluster: fused.AttentionCluster,
    reference.MultimodalAttentionClusters: fused.MultimodalAttentionClusters,
    reference.AttentionalPooling: fused.AttentionalPooling,
    reference.SpatioTemporalAttention: fused.SpatioTemporalAttention,
    reference.SpatioTemporalRegularizer: losses.SpatioTemporalRegularizer,
    reference.PyramidAttention: fused.PyramidAttention,
}


def register(module_class: type, fused_class: type) -> None:
    """Make :func:`swap` turn instances of ``module_class`` into ``fused_class``, which must
    subclass it (same attributes and parameters, plus ``backend``)."""
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"module_class must be an nn.Module subclass, got {module_class!r}")
    if not (isinstance(fused_class, type) and issubclass(fused_class, module_class)):
        raise TypeError(f"fused_class must be a subclass of {module_class.__name__}, "
                        f"got {fused_class!r}")
    TWINS[module_class] = fused_class


def swap(model: nn.Module, backend: str | None = None) -> dict[str, type]:
    """Turn every registered reference module in ``model`` (``model`` itself included) into
    its fused twin, in place. Returns ``{qualified name: the class it had}`` of what changed
    ("" names ``model`` itself). Modules that are already fused get ``backend`` set too."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in backends.CHOICES:
        raise ValueError(f"backend must be one of {backends.CHOICES}, got {backend!r}")
    fused_classes = set(TWINS.values())
    replaced: dict[str, type] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if cls in TWINS:
            module.__class__ = TWINS[cls]
            replaced[name] = cls
        elif cls not in fused_classes:
            continue
        module.backend = backend
    return replaced


def attentional_head_from_linear(linear: nn.Linear, *, backend: str | None = None
                                 ) -> fused.AttentionalPooling:
    """An :class:`attnpool.AttentionalPooling` (rank 1) whose logits equal
    ``linear(x.mean((-2, -1)))`` exactly: top-down weights are the Linear's, the bottom-up
    map is the constant 1 (weight 0, bias 1). Replace ``avgpool + flatten + fc`` of a
    pretrained classifier with it, then fine-tune the attention."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    head = fused.AttentionalPooling(linear.in_features, linear.out_features, rank=1, bias=True,
                                    backend=backend, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        head.weight_bottom_up.zero_()
        head.bias_bottom_up.fill_(1.0)
        head.weight_top_down.copy_(w[None])
        if linear.bias is not None:
            head.bias_top_down.copy_(linear.bias[None])
        else:
            head.bias_top_down.zero_()
    head.train(linear.training)
    return head


class _CallableModule(types.ModuleType):
    """``attnpool.swap(model)`` calls :func:`swap`; ``attnpool.swap.<name>`` reaches the rest."""

    def __call__(self, model: nn.Module, backend: str | None = None) -> dict[str, type]:
        return swap(model, backend)


sys.modules[__name__].__class__ = _CallableModule
