"""Text encoders of SD1 (CLIP ViT-L/14, HF `CLIPTextModel` key layout), SD2 (OpenCLIP ViT-H/14, open_clip key
layout) and SDXL (both kinds, as `conditioner.embedders.{0,1}`), tokenised by open_clip's BPE tokenizer (the
same vocabulary).

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

from .config import SIZE_EMBED_DIM, TextConfig

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
    """SD1 `cond_stage_model` (and SDXL's first tower): tokens [B, 77] -> context [B, 77, width]: the last
    layer's output after final_layer_norm (SD1), or the penultimate hidden state without it (SDXL:
    `hidden_states[11]`), per the config's `layer` and `final_norm`."""

    pad_token = EOT

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = _CLIPTextModel(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.from_embeddings(self.token_embeddings(tokens), tokens)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, N, W], before the position embeddings (where textual-inversion vectors go)."""
        return self.transformer.text_model.embeddings.token_embedding(tokens)

    def from_embeddings(self, x: torch.Tensor, tokens: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        """The context from token embeddings x [B, N, W]. skip: the output of the skip-th layer from the end
        (clip skip; 1 the last), then final_layer_norm if the config has it; None: the config's layer."""
        tm = self.transformer.text_model
        x = x + tm.embeddings.position_embedding.weight[: x.shape[1]]  # [B, N, W]
        layers = tm.encoder.layers
        skip = skip or (1 if self.cfg.layer == "last" else 2)
        for layer in layers[: len(layers) - skip + 1]:
            x = layer(x)
        return tm.final_layer_norm(x) if self.cfg.final_norm else x

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
    """SD2 `cond_stage_model` (and SDXL's second tower): tokens [B, 77] -> context [B, 77, width]: SD2 takes
    the penultimate block's output through ln_final (its last block is never run); SDXL's bigG takes it
    without ln_final and also returns the pooled embedding [B, embed_dim] = ln_final(last block's output)
    at the end token (the largest token id) @ text_projection (`pooled` in the config)."""

    pad_token = 0

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _OpenCLIPText(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.from_embeddings(self.token_embeddings(tokens), tokens)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, N, W], before the positional embedding (where textual-inversion vectors go)."""
        return self.model.token_embedding(tokens)

    def from_embeddings(
        self, x: torch.Tensor, tokens: torch.Tensor, skip: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The context (and the pooled output) from token embeddings x [B, N, W]. skip: the output of the
        skip-th block from the end (clip skip; 1 the last), then ln_final if the config has it; None: the
        config's layer. The pooled output always takes every block."""
        m, cfg = self.model, self.cfg
        x = x + m.positional_embedding[: x.shape[1]]  # [B, N, W]
        blocks = m.transformer.resblocks
        skip = skip or (1 if cfg.layer == "last" else 2)
        run = len(blocks) if cfg.pooled else len(blocks) - skip + 1
        context = x
        for k, block in enumerate(blocks[:run]):
            x = block(x)
            if k == len(blocks) - skip:
                context = x
        context = m.ln_final(context) if cfg.final_norm else context
        if not cfg.pooled:
            return context
        eot = tokens.argmax(dim=-1)  # the end token has the largest id
        pooled = m.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot] @ m.text_projection  # [B, E]
        return context, pooled

    def encode(self, prompts: list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenize(prompts, self.cfg.context_length, self.pad_token)
        return self(tokens.to(self.model.token_embedding.weight.device))


def build_text_encoder(cfg: TextConfig) -> nn.Module:
    return FrozenCLIPEmbedder(cfg) if cfg.arch == "clip" else FrozenOpenCLIPEmbedder(cfg)


# ---------------------------------------------------------------------------------------------------------
# SDXL: two towers and the size embeddings (sgm `GeneralConditioner`)
# ---------------------------------------------------------------------------------------------------------


def size_embedding(values: torch.Tensor, dim: int = SIZE_EMBED_DIM) -> torch.Tensor:
    """sgm `ConcatTimestepEmbedderND`: [B, K] numbers -> [B, K * dim], each the sinusoidal timestep
    embedding (cos first, max period 10000) of one number."""
    from .unet import timestep_embedding

    b, k = values.shape
    return timestep_embedding(values.flatten(), dim).reshape(b, k * dim)


class Conditioner(nn.Module):
    """SDXL `conditioner`: `embedders.0` (CLIP ViT-L, HF layout) and `embedders.1` (OpenCLIP bigG).
    {"crossattn": cat(context_0, context_1) [B, 77, 2048], "vector": cat(pooled_1, size embeddings) [B, 2816]}."""

    def __init__(self, text: TextConfig, text2: TextConfig):
        super().__init__()
        self.embedders = nn.ModuleList([build_text_encoder(text), build_text_encoder(text2)])

    def forward(self, prompts: list[str], sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """sizes [B, 6]: original (h, w), crop (top, left), target (h, w) per prompt."""
        context, pooled = self.encode_text(prompts)
        return {"crossattn": context, "vector": self.vector(pooled, sizes)}

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, 77, W_l + W_g], pooled [B, E]) of the prompts."""
        context_l = self.embedders[0].encode(prompts)  # [B, 77, W_l]
        context_g, pooled = self.embedders[1].encode(prompts)  # [B, 77, W_g], [B, E]
        return torch.cat([context_l, context_g], dim=-1), pooled

    @staticmethod
    def vector(pooled: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """The vector conditioning [B, E + 6 x 256]: pooled text, then the size embeddings."""
        return torch.cat([pooled, size_embedding(sizes.to(pooled.device)).to(pooled.dtype)], dim=1)
