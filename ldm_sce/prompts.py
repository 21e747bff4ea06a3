"""Prompts as AUTOMATIC1111 reads them: attention syntax, BREAK, prompts of any length in 75-token chunks,
clip skip and textual-inversion embeddings. SD1, SD2 and SDXL (both towers).

- `parse_prompt_attention(text)`: `(word)` x1.1, `[word]` / 1.1, nesting, `(word:1.3)`, escapes `\\(` `\\)`
  `\\[` `\\]` `\\\\`, `BREAK`; returns [[text, weight], ...] exactly as A1111's function of that name (its
  `modules/prompt_parser.py`): unclosed brackets still act from where they open, a `)` or `]` that closes
  nothing is text, runs of equal weight are merged, BREAK is ["BREAK", -1] (and is text again if a bracket
  around it scaled that -1). A weight that is not a number (`(a:1.2.3)`) raises ValueError, where A1111
  fails too.
- Chunks (A1111's `sd_hijack_clip.py`): each fragment is tokenised on its own, tokens go into chunks of 75
  with start and end tokens around them; a full chunk is cut after its last comma if that comma is within
  the last 20 tokens (the rest moves to the next chunk); BREAK ends a chunk. Each chunk is encoded alone,
  its token features multiplied by their weights and rescaled so that their mean is the unweighted one
  (A1111's "Original" emphasis; the mean is taken per prompt here, A1111 takes it over the batch encoded
  together, which agrees for one prompt), and the chunks are concatenated along the sequence:
  [B, 77 n, C]. Prompts of a batch, and a prompt and its negative, are padded to the same n with empty
  chunks (the empty prompt's encoding). SDXL: both towers chunk the same tokens; the pooled output comes
  from the first chunk, as in A1111.
- Clip skip N (A1111's `CLIP_stop_at_last_layers`): the output of the N-th layer from the end (1: the last),
  then each tower's own normalisation (SD1: final_layer_norm; SD2: ln_final; SDXL: none). The models' own
  layers are N = 1 (SD1) and N = 2 (SD2, SDXL); on SDXL it applies to the CLIP-L tower only (A1111's
  `sdxl_clip_l_skip`), bigG and the pooled output are unchanged.
- Embeddings (textual inversion): A1111 `.pt` (`string_to_param`) and `.safetensors` (`emb_params`; SDXL
  `clip_l` / `clip_g`) files, named by their file stem; where the name's tokens appear in a prompt, its
  vectors replace their token embeddings (a vector never straddles two chunks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint_io import CheckpointError, check_finite, read_checkpoint
from .text_encoders import EOT, SOT, _bpe

if TYPE_CHECKING:
    from .diffusion import LatentDiffusion

CHUNK = 75  # tokens per chunk, start and end tokens aside
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")  # `:1.3)`, closing a weighted group
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_SPECIAL = "\\()[]:"


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def _scan(text: str):
    """The prompt's lexical items, left to right: ('text', s), ('open', '(' | '['), ('close', ')' | ']'),
    ('weight', number text, whole match)."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":  # an escaped bracket or backslash is text; a lone backslash is dropped
            if i + 1 < n and text[i + 1] in "()[]\\":
                yield "literal", text[i + 1]
                i += 2
            else:
                yield "literal", ""
                i += 1
        elif c in "([":
            yield "open", c
            i += 1
        elif c == ":":
            m = _WEIGHT.match(text, i)
            if m:
                yield "weight", (m.group(1), m.group(0))
                i = m.end()
            else:
                yield "text", ":"
                i += 1
        elif c in ")]":
            yield "close", c
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIAL:
                j += 1
            yield "text", text[i:j]
            i = j


def parse_prompt_attention(text: str) -> list[list]:
    """[[text, weight], ...] of a prompt in AUTOMATIC1111's attention syntax (module docstring)."""
    out: list[list] = []
    opened = {"(": [], "[": []}  # start positions in `out` of the groups still open

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    def add_text(s: str) -> None:
        for k, part in enumerate(_BREAK.split(s)):
            if k:
                out.append(["BREAK", -1])
            out.append([part, 1.0])

    for kind, value in _scan(text):
        if kind == "literal":
            out.append([value, 1.0])
        elif kind == "open":
            opened[value].append(len(out))
        elif kind == "weight" and opened["("]:
            try:
                weight = float(value[0])
            except ValueError:
                raise ValueError(f"prompt weight {value[0]!r} in {value[1]!r} is not a number") from None
            scale(opened["("].pop(), weight)
        elif kind == "close" and opened["(" if value == ")" else "["]:
            scale(opened["(" if value == ")" else "["].pop(), 1.1 if value == ")" else 1 / 1.1)
        else:  # text, or a bracket or weight that closes nothing: text
            add_text(value[1] if kind == "weight" else value)
    for start in opened["("]:  # groups never closed act to the end
        scale(start, 1.1)
    for start in opened["["]:
        scale(start, 1 / 1.1)
    if not out:
        out = [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


# ---------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Embedding:
    """A textual-inversion embedding: its name, its token ids, and its vectors per tower width."""

    name: str
    ids: list[int]
    vectors: dict[str, torch.Tensor]  # 'clip_l' / 'clip_g' (SDXL) or 'emb' (SD1, SD2): [n, width]

    @property
    def length(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def load_embedding(path: str | Path) -> Embedding:
    """An A1111 embedding file, through the safe reader; its name is the file stem."""
    path = Path(path)
    sd, extras = read_checkpoint(path)
    vectors: dict[str, torch.Tensor] = {}
    if "clip_l" in sd or "clip_g" in sd:
        vectors = {k: sd[k] for k in ("clip_l", "clip_g") if k in sd}
    elif "emb_params" in sd:
        vectors = {"emb": sd["emb_params"]}
    elif isinstance(extras.get("string_to_param"), dict) and extras["string_to_param"]:
        params = list(extras["string_to_param"].values())
        if len(params) != 1 or not isinstance(params[0], torch.Tensor):
            raise CheckpointError(f"{path}: string_to_param holds {len(params)} entries; expected one tensor")
        vectors = {"emb": params[0]}
    elif len(sd) == 1:  # diffusers' learned_embeds.bin: {"<token>": [width]}
        vectors = {"emb": next(iter(sd.values()))}
    if not vectors:
        raise CheckpointError(
            f"{path}: not a textual-inversion embedding (no string_to_param, emb_params or clip_l/clip_g)"
        )
    vectors = {k: (v[None] if v.ndim == 1 else v).float() for k, v in vectors.items()}
    check_finite(vectors, path)
    if any(v.ndim != 2 or v.shape[0] == 0 or v.shape[0] > CHUNK for v in vectors.values()):
        raise CheckpointError(
            f"{path}: embedding vectors {[tuple(v.shape) for v in vectors.values()]}, expected [n <= 75, width]"
        )
    if len({v.shape[0] for v in vectors.values()}) != 1:
        raise CheckpointError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    ids = _bpe().encode(path.stem)
    if not ids:
        raise CheckpointError(f"{path}: the file name gives no tokens to write it in a prompt; rename the file")
    return Embedding(path.stem, ids, vectors)


# ---------------------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """77 token ids (start, 75, end), their weights, and (offset, embedding) replacements."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


def _comma() -> int:
    return _bpe().encode(",")[0]


def prompt_chunks(text: str, embeddings: list[Embedding] = ()) -> list[Chunk]:
    """The chunks of a prompt (module docstring), each 77 tokens long."""
    bpe, comma = _bpe(), _comma()
    by_first: dict[int, list[Embedding]] = {}
    for e in sorted(embeddings, key=lambda e: len(e.ids), reverse=True):
        by_first.setdefault(e.ids[0], []).append(e)
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:  # pad with end tokens, put start and end around it
        nonlocal chunk, last_comma
        pad = CHUNK - len(chunk.tokens)
        chunk.tokens = [SOT] + chunk.tokens + [EOT] * pad + [EOT]
        chunk.weights = [1.0] + chunk.weights + [1.0] * pad + [1.0]
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for fragment, weight in parse_prompt_attention(text):
        if fragment == "BREAK" and weight == -1:
            close()
            continue
        tokens = bpe.encode(fragment)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the text after the last comma moves to the next chunk
                moved = (chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk.tokens, chunk.weights = list(moved[0]), list(moved[1])
            if len(chunk.tokens) == CHUNK:
                close()
            emb = next((e for e in by_first.get(token, []) if tokens[i : i + len(e.ids)] == e.ids), None)
            if emb is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                i += 1
                continue
            if len(chunk.tokens) + emb.length > CHUNK:
                close()
            chunk.fixes.append((len(chunk.tokens), emb))
            chunk.tokens += [0] * emb.length
            chunk.weights += [weight] * emb.length
            i += len(emb.ids)
    if chunk.tokens or not chunks:
        close()
    return chunks


def _empty_chunk() -> Chunk:
    return Chunk([SOT] + [EOT] * (CHUNK + 1), [1.0] * (CHUNK + 2))


# ---------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------


def _encode_tower(encoder, chunks: list[list[Chunk]], key: str, skip: int | None):
    """Context [B, 77 n, W] (and the pooled output of the first chunk, for a tower that has one)."""
    device = next(encoder.parameters()).device
    contexts, pooled = [], None
    for i in range(len(chunks[0])):
        batch = [c[i] for c in chunks]
        tokens = torch.tensor([c.tokens for c in batch], device=device)
        if encoder.pad_token != EOT:  # after the first end token, the tower's own pad (SD2's 0)
            for row in tokens:
                row[int((row == EOT).nonzero()[0]) + 1 :] = encoder.pad_token
        x = encoder.token_embeddings(tokens)
        for b, c in enumerate(batch):
            for offset, emb in c.fixes:
                vec = emb.vectors.get(key, emb.vectors.get("emb"))
                if vec is None or vec.shape[1] != x.shape[-1]:
                    raise CheckpointError(
                        f"embedding {emb.name!r}: vectors of width {None if vec is None else vec.shape[1]}, "
                        f"this text encoder's are {x.shape[-1]}: an embedding for another base model"
                    )
                x[b, offset + 1 : offset + 1 + emb.length] = vec.to(x)
        out = encoder.from_embeddings(x, tokens, skip)
        z, p = out if isinstance(out, tuple) else (out, None)
        weights = torch.tensor([c.weights for c in batch], device=device, dtype=z.dtype)
        if not bool((weights == 1).all()):
            mean = z.mean(dim=(1, 2), keepdim=True)
            z = z * weights[..., None]
            z = z * (mean / z.mean(dim=(1, 2), keepdim=True))
        contexts.append(z)
        pooled = p if i == 0 else pooled
    return torch.cat(contexts, dim=1), pooled


def _pad(chunks: list[list[Chunk]], n: int) -> list[list[Chunk]]:
    return [c + [_empty_chunk() for _ in range(n - len(c))] for c in chunks]


def encode_prompts(
    model: LatentDiffusion,
    prompts: list[str],
    negative_prompts: list[str] | None = None,
    clip_skip: int | None = None,
    embeddings: list[Embedding] = (),
    sizes: dict | None = None,
):
    """(c, uc) for prompts in A1111's syntax, of any length (module docstring): the context [B, 77 n, C] or
    SDXL's dict, the negative prompts padded to the same n. negative_prompts None: the model's own
    unconditional branch (SD1/SD2: the empty prompt; SDXL: sgm's zeros). sizes: SDXL's original_size,
    crop_coords, target_size."""
    if clip_skip is not None and not (type(clip_skip) is int and 1 <= clip_skip <= model.cfg.text.layers):
        raise ValueError(f"clip skip must be 1 to {model.cfg.text.layers} (the text encoder's layers), got {clip_skip}")
    pos = [prompt_chunks(p, embeddings) for p in prompts]
    neg = [prompt_chunks(p, embeddings) for p in negative_prompts] if negative_prompts is not None else None
    n = max(len(c) for c in pos + (neg or []))
    with torch.no_grad():
        c = _encode(model, _pad(pos, n), clip_skip, sizes)
        if neg is None:
            uc = model.get_unconditional_conditioning(c) if model.cfg.family == "sdxl" else None
            if uc is None:
                uc = _encode(model, _pad([prompt_chunks("")] * len(prompts), n), clip_skip, sizes)
        else:
            uc = _encode(model, _pad(neg, n), clip_skip, sizes)
            if model.cfg.family == "sdxl":  # the size embeddings are the prompt's
                pooled_dim = model.cfg.text2.embed_dim
                uc["vector"] = torch.cat([uc["vector"][:, :pooled_dim], c["vector"][:, pooled_dim:]], 1)
    return c, uc


def _encode(model: LatentDiffusion, chunks: list[list[Chunk]], clip_skip: int | None, sizes: dict | None):
    if model.cfg.family != "sdxl":
        return _encode_tower(model.cond_stage_model, chunks, "emb", clip_skip)[0]
    clip_l, big_g = model.conditioner.embedders
    context_l, _ = _encode_tower(clip_l, chunks, "clip_l", clip_skip)
    context_g, pooled = _encode_tower(big_g, chunks, "clip_g", None)
    native = (model.cfg.native_size, model.cfg.native_size)
    sizes = sizes or {}
    six = [*(sizes.get("original_size") or native), *(sizes.get("crop_coords") or (0, 0))]
    six += [*(sizes.get("target_size") or native)]
    vector = model.conditioner.vector(pooled, torch.tensor([six] * len(chunks), dtype=torch.float32))
    return {"crossattn": torch.cat([context_l, context_g], dim=-1), "vector": vector}
