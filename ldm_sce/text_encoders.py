"""Text encoders of SD1 (CLIP ViT-L/14, HF `CLIPTextModel` key layout) and SD2 (OpenCLIP ViT-H/14,
open_clip key layout), both tokenised by open_clip's BPE tokenizer (the same vocabulary).

Both map a list of prompts to `[B, 77, width]` token features (the UNet's cross-attention context):
- SD1 (`transformer.text_model.*`): quick_gelu, causal mask, last layer then `final_layer_norm`;
  padding with the end token 49407.
- SD2 (`model.*`): exact GELU, causal mask, output of the penultimate block then `ln_final`; padding 0.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import TextConfig

SOT, EOT = 49406, 49407
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer  # imported lazily: open_clip pulls in timm

    return SimpleTokenizer()


def tokenize(prompts: list[str], context_length: int = 77, pad: int = 0) -> torch.Tensor:
    """[B, context_length] int64: start token, BPE tokens (truncated, with a warning), end token, then `pad`."""
    bpe = _bpe()
    out = torch.full((len(prompts), context_length), pad, dtype=torch.long)
    for i, text in enumerate(prompts):
        tokens = bpe.encode(text)
        if len(tokens) > context_length - 2:
            kept = bpe.decode(tokens[: context_length - 2])
            log.warning(
                "a prompt of %d tokens: the text encoder reads the first %d, up to '...%s'; the rest is ignored",
                len(tokens),
                context_length - 2,
                kept[-30:].strip(),
            )
        ids = [SOT] + tokens[: context_length - 2] + [EOT]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _causal_attention(qkv: torch.Tensor, heads: int, out_proj: nn.Linear) -> torch.Tensor:
    """qkv [B, N, 3W] -> causal multi-head attention -> out_proj, [B, N, W]."""
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)  # each [B, H, N, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, N, D]
    return out_proj(rearrange(out, "b h n d -> b n (h d)"))


# ---------------------------------------------------------------------------------------------------------
# SD1: CLIP ViT-L/14 text tower, HF transformers layout
# ---------------------------------------------------------------------------------------------------------


class _CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return _causal_attention(qkv, self.heads, self.out_proj)


class _CLIPMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width * 4)
        self.fc2 = nn.Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class _CLIPLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_attn = _CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = _CLIPMLP(width)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        # Stored in SD1 files (and counted in their key set) but often corrupt there; never read.
        self.register_buffer("position_ids", torch.arange(cfg.context_length)[None])


class _CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(_CLIPLayer(cfg.width, cfg.heads) for _ in range(cfg.layers))


class _CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = _CLIPEmbeddings(cfg)
        self.encoder = _CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class _CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_model = _CLIPTextTransformer(cfg)


class FrozenCLIPEmbedder(nn.Module):
    """SD1 `cond_stage_model`: tokens [B, 77] -> last hidden state after final LayerNorm [B, 77, width]."""

    pad_token = EOT

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = _CLIPTextModel(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tm = self.transformer.text_model
        n = tokens.shape[1]
        x = tm.embeddings.token_embedding(tokens) + tm.embeddings.position_embedding.weight[:n]
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = tokenize(prompts, self.cfg.context_length, self.pad_token)
        return self(tokens.to(self.transformer.text_model.embeddings.token_embedding.weight.device))


# ---------------------------------------------------------------------------------------------------------
# SD2: OpenCLIP ViT-H/14 text tower, open_clip layout
# ---------------------------------------------------------------------------------------------------------


class _MultiheadAttention(nn.Module):
    """Key layout of `nn.MultiheadAttention`: packed `in_proj_weight` [3W, W] (q, k, v) and `out_proj`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _causal_attention(F.linear(x, self.in_proj_weight, self.in_proj_bias), self.heads, self.out_proj)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualAttentionBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))


class _OpenCLIPText(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = _OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        # The two below are stored in SD2 files but unused for conditioning (pooled/contrastive outputs).
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        nn.init.constant_(self.logit_scale, 4.6052)


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD2 `cond_stage_model`: tokens [B, 77] -> ln_final(penultimate block output) [B, 77, width].
    The last of the stored blocks is never run."""

    pad_token = 0

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _OpenCLIPText(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding[: tokens.shape[1]]
        for block in m.transformer.resblocks[:-1]:  # penultimate layer
            x = block(x)
        return m.ln_final(x)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = tokenize(prompts, self.cfg.context_length, self.pad_token)
        return self(tokens.to(self.model.token_embedding.weight.device))


def build_text_encoder(cfg: TextConfig) -> nn.Module:
    return FrozenCLIPEmbedder(cfg) if cfg.arch == "clip" else FrozenOpenCLIPEmbedder(cfg)
