"""Model surgery: put attnpool modules into existing models."""

from __future__ import annotations

import torch
from torch import nn

from attnpool.nn import AttentionalPooling

__all__ = ["attentional_head_from_linear"]


def attentional_head_from_linear(linear: nn.Linear, *, backend: str | None = None
                                 ) -> AttentionalPooling:
    """An :class:`attnpool.AttentionalPooling` (rank 1) whose logits equal
    ``linear(x.mean((-2, -1)))`` exactly: top-down weights are the Linear's, the bottom-up
    map is the constant 1 (weight 0, bias 1). Replace ``avgpool + flatten + fc`` of a
    pretrained classifier with it, then fine-tune the attention."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    head = AttentionalPooling(linear.in_features, linear.out_features, rank=1, bias=True,
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
