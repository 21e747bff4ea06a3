"""Cross-attention and the SpatialTransformer of the SD UNet (CompVis `ldm/modules/attention.py` layout).

Attribute names are the checkpoint keys: `proj_in`, `transformer_blocks.{i}.{attn1,attn2,ff,norm1..3}`,
`proj_out`. All attention goes through `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import Conv2d, geglu, recompute_frozen


class CrossAttention(nn.Module):
    """Multi-head attention of `x` [B, N, query_dim] over `context` [B, M, context_dim] (self-attention
    when `context` is None). Scale dim_head**-0.5; q/k/v projections have no bias, the output one has."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))  # Dropout keeps index 0

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        # heads as views of the projections; SDPA takes the strided layout as it is
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # [B, H, N, D]
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)  # [B, H, M, D]
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)  # [B, H, M, D]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D]
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # [B, N, query_dim]


class GEGLU(nn.Module):
    """`a * gelu(b)` where [a, b] = proj(x) split in halves (exact GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # frozen: keep x (dim_in wide), not proj(x) (2 * dim_out = 8x wider), for backward
        return recompute_frozen(lambda x: geglu(self.proj(x)), x, self.proj)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # keys ff.net.0.proj and ff.net.2; the Dropout only holds index 1
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention, feed-forward; each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features [B, C, H, W] attend to text tokens [B, 77, context_dim]; output has the input's shape.

    SD1: proj_in/proj_out are 1x1 convs applied in [B, C, H, W]. SD2 (`linear`): Linear layers applied to
    the [B, HW, C] tokens. GroupNorm eps 1e-6.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x_in = x  # [B, C, H, W]
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)  # [B, inner, H, W]
        x = rearrange(x, "b c h w -> b (h w) c")  # tokens [B, HW, C]; a view in channels_last
        if self.linear:
            x = self.proj_in(x)  # [B, HW, inner]
        for block in self.transformer_blocks:
            x = block(x, context)  # [B, HW, inner]
        if self.linear:
            x = self.proj_out(x)  # [B, HW, C]
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
        if not self.linear:
            x = self.proj_out(x)  # [B, C, H, W]
        return x + x_in
