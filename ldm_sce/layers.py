"""Layers that store less for backward, with the same keys and results as the plain ones.

In SCEdit training every UNet layer is frozen while gradients flow through the decoder, so anything a
layer keeps only for its weight gradient is pure overhead.
- `Conv2d`: PyTorch's convolution keeps its input even when only the input gradient is wanted, which
  needs the weight alone. When the weight is frozen and the input needs a gradient, keep only the weight
  (already held by the model).
- `geglu`: `a * gelu(b)` keeps both `[a, b]` and `gelu(b)`; keep `[a, b]` and recompute `gelu(b)`.
- `recompute_frozen`: a cheap frozen piece (GroupNorm + SiLU in a ResBlock; the feed-forward's input
  projection + GEGLU) keeps only its input and reruns in backward (`torch.utils.checkpoint`). GroupNorm
  keeps its input anyway, so GroupNorm + SiLU stops keeping SiLU's input; the projection's output is 8x
  its input (SD1 at 512px: 210 MB of activations instead of 26 MB), for one extra linear per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class _FrozenWeightConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        # under autocast the forward ran on the weight cast to the activations' dtype (fp16/bf16), and so
        # does autocast's own backward: the same cast here (backward runs outside the autocast region)
        w = weight.to(grad.dtype)
        return torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups), *([None] * 6)


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and not (self.bias is not None and self.bias.requires_grad)
        if frozen and x.requires_grad and torch.is_grad_enabled() and self.padding_mode == "zeros":
            return _FrozenWeightConv2d.apply(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return super().forward(x)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        a, b = h.chunk(2, dim=-1)
        return a * F.gelu(b)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        with torch.enable_grad():
            b = b.detach().requires_grad_()
            gate = F.gelu(b)
            (grad_b,) = torch.autograd.grad(gate, b, grad * a)
        return torch.cat([grad * gate.detach(), grad_b], dim=-1)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """a * gelu(b) for [a, b] = h split in halves along the last dim (exact GELU)."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _GEGLU.apply(h)
    a, b = h.chunk(2, dim=-1)
    return a * F.gelu(b)


def recompute_frozen(fn, x: torch.Tensor, *modules: nn.Module) -> torch.Tensor:
    """fn(x); when x needs a gradient and every parameter of `modules` (those fn uses) is frozen, keep only
    x for backward and rerun fn there. Trainable modules, or no gradient wanted: fn(x) as it is."""
    if (
        torch.is_grad_enabled()
        and x.requires_grad
        and not any(p.requires_grad for m in modules for p in m.parameters())
    ):
        return checkpoint(fn, x, use_reentrant=False, preserve_rng_state=False)  # fn draws no random numbers
    return fn(x)
