"""Prompts as AUTOMATIC1111 reads them: the attention parser against stored outputs of A1111's function
(derived by running the function as published, read from `modules/prompt_parser.py`), and the conditioning of
weighted, long, BREAK and embedding prompts, and clip skip, against an independent computation with
transformers' text models built from the same checkpoint by diffusers' conversion code."""

import json
from pathlib import Path

import pytest
import torch
from helpers import hf_text_towers
from safetensors.torch import load_file, save_file

from ldm_sce import CheckpointError, load_model
from ldm_sce.prompts import encode_prompts, load_embedding, parse_prompt_attention, prompt_chunks
from ldm_sce.text_encoders import EOT, SOT, _bpe

EXPECTED = json.loads((Path(__file__).parent / "data" / "prompt_attention.json").read_text())


@pytest.mark.parametrize("prompt", sorted(EXPECTED))
def test_parse_prompt_attention_is_a1111s(prompt):
    assert parse_prompt_attention(prompt) == EXPECTED[prompt]


def test_parser_cases_cover_the_syntax():
    assert len(EXPECTED) >= 60
    assert EXPECTED["a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."][1] == ["house", 1.5730000000000004]
    assert EXPECTED["(a BREAK b)"] == [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]  # a scaled BREAK is text
    assert EXPECTED["a BREAK b"] == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert EXPECTED["(a:0.5e1)"] == [["a:0.5e1", 1.1]]  # no exponents: the ':' is text


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "(a:.)", "(a:+.)"])
def test_a_weight_that_is_no_number_is_an_error(prompt):
    with pytest.raises(ValueError, match="is not a number"):
        parse_prompt_attention(prompt)


# ---------------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_files):
    """{family: (our model, the file's state dict, config)}."""
    return {f: (load_model(path, config=cfg), load_file(path), cfg) for f, (path, cfg) in tiny_files.items()}


def oracle(models, family):
    """transformers' text towers from the checkpoint (diffusers' conversion), as (module, pad)."""
    _, sd, cfg = models[family]
    return hf_text_towers(cfg, sd)


def ids(text):
    return _bpe().encode(text)


def chunk(tokens, pad):
    """[SOT] + tokens + [EOT], then `pad` to 77."""
    row = [SOT] + tokens + [EOT]
    return row + [pad] * (77 - len(row))


def _tm(hf):
    """The text transformer of a transformers CLIP model (CLIPTextModel is it in transformers 5)."""
    return getattr(hf, "text_model", hf)


def features(family, hf, tokens, skip=None):
    """The oracle's context for one chunk [1, 77]: SD1 last layer + final norm, SD2 penultimate + final
    norm, SDXL penultimate without; clip skip N: hidden_states[-N] (with the norm where the model has one)."""
    out = hf(torch.tensor([tokens]), output_hidden_states=True)
    if family == "sd1":
        return _tm(hf).final_layer_norm(out.hidden_states[-(skip or 1)])
    if family == "sd2":
        return _tm(hf).final_layer_norm(out.hidden_states[-(skip or 2)])
    return out.hidden_states[-(skip or 2)]


def weighted(z, weights):
    """A1111's emphasis: z * w, then rescaled to the unweighted mean."""
    w = torch.tensor(weights)[None, :, None]
    zw = z * w
    return zw * (z.mean() / zw.mean())


def test_weighted_long_and_break_prompts_match_an_independent_computation(models):
    model, _, cfg = models["sd1"]
    ((hf, pad),) = oracle(models, "sd1")
    cat, dog, comma = ids("cat")[0], ids("dog")[0], ids(",")[0]
    prompt = "cat " * 70 + ", " + "dog " * 30  # 101 tokens; the first chunk is cut after the comma
    chunks = prompt_chunks(prompt)
    first = chunk([cat] * 70 + [comma], pad)
    second = chunk([dog] * 30, pad)
    assert [c.tokens for c in chunks] == [first, second]
    c, uc = encode_prompts(model, [prompt], [""])
    with torch.no_grad():
        expected = torch.cat([features("sd1", hf, first), features("sd1", hf, second)], dim=1)
        empty = features("sd1", hf, chunk([], pad))
    assert c.shape == (1, 154, cfg.text.width)
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uc, torch.cat([empty, empty], dim=1), rtol=1e-5, atol=1e-5)  # padded to 2 chunks
    # weights: (red:1.5) and [cat] on their tokens, the mean restored; BREAK starts a chunk
    c, _ = encode_prompts(model, ["a (red:1.5) [cat] BREAK on a mat"], None)
    a, red, mat = ids("a")[0], ids("red")[0], ids("mat")[0]
    on = ids("on")[0]
    tokens1, tokens2 = chunk([a, red, cat], pad), chunk([on, a, mat], pad)
    w1 = [1.0, 1.0, 1.5, 1 / 1.1] + [1.0] * 73
    with torch.no_grad():
        expected = torch.cat([weighted(features("sd1", hf, tokens1), w1), features("sd1", hf, tokens2)], dim=1)
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-5)


def test_a_plain_short_prompt_is_exactly_get_learned_conditioning(models):
    for family in ("sd1", "sd2", "sdxl"):
        model = models[family][0]
        c, _ = encode_prompts(model, ["a photograph of an astronaut riding a horse"], None)
        ref = model.get_learned_conditioning(["a photograph of an astronaut riding a horse"])
        for k in ("crossattn", "vector") if family == "sdxl" else (None,):
            assert torch.equal(c[k] if k else c, ref[k] if k else ref)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_chunks_and_pooled_output(models, family):
    model, _, cfg = models[family]
    towers = oracle(models, family)
    prompt = "a (tall:1.2) lighthouse BREAK on a rocky coast"
    c, _ = encode_prompts(model, [prompt], None)
    a, tall, light = ids("a")[0], ids("tall")[0], ids("lighthouse")
    first = [a, tall, *light]
    second = ids("on a rocky coast")
    w1 = [1.0, 1.0, 1.2] + [1.0] * 74
    parts = []
    with torch.no_grad():
        for hf, pad in towers:
            one = weighted(features(family, hf, chunk(first, pad)), w1)
            two = features(family, hf, chunk(second, pad))
            parts.append(torch.cat([one, two], dim=1))
        expected = torch.cat(parts, dim=-1)
    context = c["crossattn"] if family == "sdxl" else c
    assert context.shape[1] == 154
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)
    if family == "sdxl":  # pooled: bigG's projected output of the first chunk, unweighted
        big_g, pad = towers[1]
        with torch.no_grad():
            pooled = big_g(torch.tensor([chunk(first, pad)])).text_embeds
        torch.testing.assert_close(c["vector"][:, : cfg.text2.embed_dim], pooled, rtol=1e-5, atol=1e-5)


def test_batches_of_prompts_are_invariant(models):
    model = models["sd1"][0]
    prompts = ["a (red:1.3) cat", "cat, " * 40]  # one chunk and two
    both, _ = encode_prompts(model, prompts, None)
    for i, p in enumerate(prompts):
        alone, _ = encode_prompts(model, [p], None)
        torch.testing.assert_close(both[i : i + 1, : alone.shape[1]], alone, rtol=0, atol=1e-6)
    empty = model.get_learned_conditioning([""])
    torch.testing.assert_close(both[0:1, 77:], empty, rtol=0, atol=1e-6)  # the short one padded with an empty chunk


@pytest.mark.parametrize("family,skip", [("sd1", 2), ("sd2", 3), ("sdxl", 3)])
def test_clip_skip_is_a1111s_layer(models, family, skip):
    model, _, cfg = models[family]
    towers = oracle(models, family)
    prompt = "a red cat on a mat"
    c, _ = encode_prompts(model, [prompt], None, clip_skip=skip)
    hf, pad = towers[0]
    with torch.no_grad():
        expected = features(family, hf, chunk(ids(prompt), pad), skip=skip)
        if family == "sdxl":  # the CLIP-L part only; bigG unchanged
            ref = model.get_learned_conditioning([prompt])
            torch.testing.assert_close(c["crossattn"][..., : cfg.text.width], expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(c["crossattn"][..., cfg.text.width :], ref["crossattn"][..., cfg.text.width :])
            return
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="clip skip must be 1 to"):
        encode_prompts(model, [prompt], None, clip_skip=cfg.text.layers + 1)


def test_textual_inversion_embeddings_replace_their_token_embeddings(models, tmp_path):
    model, _, cfg = models["sd1"]
    ((hf, pad),) = oracle(models, "sd1")
    vectors = torch.randn(3, cfg.text.width, generator=torch.Generator().manual_seed(0))
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 9},
        tmp_path / "mycat.pt",
    )
    (tmp_path / "st").mkdir()
    save_file({"emb_params": vectors}, str(tmp_path / "st" / "mycat.safetensors"))
    emb = load_embedding(tmp_path / "mycat.pt")
    assert emb.name == "mycat" and emb.length == 3
    prompt = "a photo of (mycat:1.2) on a mat"
    c, _ = encode_prompts(model, [prompt], None, embeddings=[emb])
    # independent: extend the oracle's vocabulary with the three vectors and write them as new token ids
    vocab = _tm(hf).embeddings.token_embedding.weight.shape[0]
    table = torch.nn.Embedding(vocab + 3, cfg.text.width)
    with torch.no_grad():
        table.weight[:vocab] = _tm(hf).embeddings.token_embedding.weight
        table.weight[vocab:] = vectors
    _tm(hf).embeddings.token_embedding = table
    tokens = ids("a photo of ") + [vocab, vocab + 1, vocab + 2] + ids(" on a mat")
    weights = [1.0] * 4 + [1.2] * 3 + [1.0] * (77 - 7)
    with torch.no_grad():
        expected = weighted(features("sd1", hf, chunk(tokens, pad)), weights)
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-5)
    c2, _ = encode_prompts(model, [prompt], None, embeddings=[load_embedding(tmp_path / "st" / "mycat.safetensors")])
    assert torch.equal(c, c2)  # the .safetensors layout gives the same vectors
    assert prompt_chunks("mycat mycat", [emb])[0].tokens[1:7] == [0] * 6  # each use: three placeholders


def test_embeddings_for_another_base_or_broken_files_are_refused(models, tmp_path):
    xl = models["sdxl"][0]
    save_file({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 32)}, str(tmp_path / "style.safetensors"))
    emb = load_embedding(tmp_path / "style.safetensors")
    encode_prompts(xl, ["in style"], None, embeddings=[emb])  # both towers' vectors: fine on SDXL
    save_file({"emb_params": torch.zeros(2, 48)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="width 48.*another base model"):
        encode_prompts(
            models["sd1"][0], ["a wide thing"], None, embeddings=[load_embedding(tmp_path / "wide.safetensors")]
        )
    save_file({"foo": torch.zeros(2, 32), "bar": torch.zeros(2)}, str(tmp_path / "notemb.safetensors"))
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "notemb.safetensors")
    save_file({"emb_params": torch.full((2, 32), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError):
        load_embedding(tmp_path / "nan.safetensors")
