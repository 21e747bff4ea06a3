"""Fuzzing the readers of untrusted input with hypothesis: damaged checkpoints (truncated, bytes replaced, the
pickle inside a valid zip mutated), arbitrary tuner metadata, arbitrary model and training configs. The only
exceptions allowed out are the project's own (CheckpointError, ConfigError).

Examples per test: LDM_SCE_FUZZ_EXAMPLES (default 60, which CI runs; the figures in the issue notes come
from runs with 5,000)."""

import io
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ldm_sce import PRESETS, CheckpointError, ConfigError, LatentDiffusion, load_config
from ldm_sce.checkpoint_io import file_kind, read_checkpoint
from ldm_sce.config import config_from_dict, to_compvis_yaml
from ldm_sce.train_config import load_train_config
from ldm_sce.tuner_files import load_tuner, read_tuner_file
from ldm_sce.tuners import SkipIdentity

EXAMPLES = int(os.environ.get("LDM_SCE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
WORK = Path(tempfile.mkdtemp(prefix="ldm-sce-fuzz-"))


def _state():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 4, generator=g)
    return {"a.weight": shared, "a.view": shared[1:3], "b": torch.arange(5), "c": torch.randn(3, generator=g).half()}


def _ckpt_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": _state(), "global_step": 7, "callbacks": {"x": [1, 2.5, "s"]}}, buf)
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    path = WORK / "valid.safetensors"
    save_file({k: v.clone().contiguous() for k, v in _state().items()}, str(path), metadata={"k": "v"})
    return path.read_bytes()


CKPT, SAFETENSORS = _ckpt_bytes(), _safetensors_bytes()


def _read(data: bytes, suffix: str) -> None:
    path = WORK / f"case{suffix}"
    path.write_bytes(data)
    try:
        sd, extras = read_checkpoint(path)
    except CheckpointError:
        event("refused with CheckpointError")
        return
    event("read")
    assert isinstance(sd, dict) and isinstance(extras, dict)
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    file_kind(sd, extras)  # and naming what it is never fails either


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


EDITS = st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=8)
CUT = st.one_of(st.none(), st.integers(0, 10**7))


@FUZZ
@given(edits=EDITS, cut=CUT, suffix=st.sampled_from([".ckpt", ".safetensors", ".bin"]))
def test_damaged_checkpoint_files(edits, cut, suffix):
    for data in (CKPT, SAFETENSORS):
        _read(_mutate(data, edits, None if cut is None else cut % (len(data) + 1)), suffix)


def _zip_with(pickle_bytes: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(CKPT))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for name in src.namelist():
            out.writestr(name, pickle_bytes if name.endswith("data.pkl") else src.read(name))
    return buf.getvalue()


PICKLE = zipfile.ZipFile(io.BytesIO(CKPT)).read(
    next(n for n in zipfile.ZipFile(io.BytesIO(CKPT)).namelist() if n.endswith("data.pkl"))
)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(PICKLE) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, len(PICKLE))),
)
def test_mutated_pickles_in_a_valid_archive(edits, cut):
    """The unpickler itself: opcodes, storage records, sizes and strides, all damaged inside an intact zip."""
    _read(_zip_with(_mutate(PICKLE, edits, cut)), ".ckpt")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "format",
    "kind",
    "base",
    "skip_dims",
    "skips",
    "down_ratio",
    "op",
    "kernel",
    "hint_channels",
    "hint_ratio",
    "condition",
    "training",
]
GOOD = {"kind": "sc", "skip_dims": [64, 64, 64, 64, 64, 32, 32, 32, 32], "skips": [0], "base": "sd1"}


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpts):
    from ldm_sce import load_model

    return load_model(tiny_ckpts["sd1"][1], config="tiny-sd1")


def _tuner_weights():
    g = torch.Generator().manual_seed(1)
    return {
        f"tuners.0.{n}": torch.randn(*s, generator=g) * 0.01
        for n, s in (("ln1.weight", (64, 64)), ("ln1.bias", (64,)), ("ln2.weight", (64, 64)), ("ln2.bias", (64,)))
    }


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON, max_size=5),
    drop=st.lists(st.sampled_from(list(GOOD)), max_size=2),
    raw=st.one_of(st.none(), st.text(max_size=30)),
)
def test_arbitrary_tuner_metadata(tiny_model, changes, drop, raw):
    meta = {k: v for k, v in {**GOOD, **changes}.items() if k not in drop}
    try:
        text = raw if raw is not None else json.dumps(meta)
    except ValueError:  # NaN inside: JSON cannot carry it
        text = json.dumps(meta, allow_nan=True)
    path = WORK / "tuner.safetensors"
    save_file(_tuner_weights(), str(path), metadata={"ldm_sce.tuner": text})
    unet = tiny_model.model.diffusion_model
    try:
        read_tuner_file(path)
        load_tuner(tiny_model, path)
        event("loaded")
    except CheckpointError:
        event("refused with CheckpointError")
    finally:  # the next example starts from the bare model
        unet.replace_tuners([SkipIdentity() for _ in unet.tuners])
        unet.replace_controllers([])


_LORA_PARTS = ["lora_down.weight", "lora_up.weight", "alpha", "lora_A.weight", "lora_B.weight", "hada_w1_a"]


@pytest.fixture(scope="module")
def lora_names(tiny_model):
    from ldm_sce.lora import lora_targets

    names = sorted(lora_targets(tiny_model))
    return names[:: max(1, len(names) // 40)] + ["unet.down_blocks.0.resnets.0.conv1", "lora_te2_text_model_x"]


@FUZZ
@given(
    data=st.data(),
    entries=st.lists(  # (layer, part, shape, value)
        st.tuples(
            st.integers(0, 10_000),
            st.sampled_from(_LORA_PARTS) | st.text(max_size=8),
            st.just("fit") | st.lists(st.sampled_from([0, 1, 2, 3, 32, 64, 128]), max_size=4),
            st.sampled_from([0.0, 0.1, float("nan"), float("inf")]),
        ),
        max_size=6,
    ),
    meta=st.dictionaries(
        st.sampled_from(["ss_base_model_version", "modelspec.architecture", "ss_v2"]),
        st.sampled_from(["sd_v1", "sd_v2", "sdxl_base_v1-0", "stable-diffusion-v1", "True", ""]) | st.text(max_size=8),
        max_size=2,
    ),
)
def test_arbitrary_lora_files(tiny_model, lora_names, data, entries, meta):
    from ldm_sce.lora import load_lora, lora_targets, remove_lora

    targets = lora_targets(tiny_model)
    tensors = {}  # a valid two-layer LoRA, then the entries added or written over it
    for name in lora_names[:2]:
        w = targets[name].shape
        tensors[f"{name}.lora_down.weight"] = torch.full((2, *w[1:]), 0.1)
        tensors[f"{name}.lora_up.weight"] = torch.full((w[0], 2), 0.1)
    for index, part, shape, fill in entries:
        name = lora_names[index % len(lora_names)]
        if shape == "fit":  # the layer's own shapes (rank 2), so that some files are valid
            w = targets[name].shape if name in targets else (4, 4)
            shape = {"lora_down.weight": (2, *w[1:]), "lora_up.weight": (w[0], 2)}.get(part, ())
        if math.prod(shape) <= 2**20:
            tensors[f"{name}.{part}"] = torch.full(shape, fill)
    path = WORK / "lora.safetensors"
    save_file(tensors, str(path), metadata=meta)
    try:
        load_lora(tiny_model, path, weight=data.draw(st.floats(-2, 2)))  # on the fly: removed after each
        event("loaded")
    except CheckpointError:
        event("refused with CheckpointError")
    finally:
        remove_lora(tiny_model)


MODEL_KEYS = [
    "family",
    "unet",
    "vae",
    "text",
    "parameterization",
    "scale_factor",
    "linear_start",
    "linear_end",
    "timesteps",
    "image_size",
    "preset",
    "model_channels",
    "channel_mult",
    "num_heads",
    "arch",
    "width",
]


@FUZZ
@given(
    data=st.dictionaries(
        st.sampled_from(MODEL_KEYS) | st.text(max_size=5),
        JSON | st.dictionaries(st.sampled_from(MODEL_KEYS), JSON, max_size=4),
        max_size=5,
    )
)
def test_arbitrary_model_configs(data):
    try:
        config_from_dict(data)
    except ConfigError:
        pass
    path = WORK / "model.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except yaml.YAMLError:
        return
    try:
        load_config(path)
    except ConfigError:
        pass


def _paths(d, prefix=()):
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


def _edited(base: dict, edits: list[tuple[int, object]], deletes: list[int]) -> dict:
    """`base` (a valid config) with values at some of its key paths replaced or deleted."""
    import copy

    out = copy.deepcopy(base)
    paths = list(_paths(base))
    for k, value in edits:
        *parents, leaf = paths[k % len(paths)]
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[leaf] = value
    for k in deletes:
        *parents, leaf = paths[k % len(paths)]
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


VALID_MODEL_CONFIGS = [
    to_compvis_yaml(PRESETS["sd-v2-v"]),
    PRESETS["tiny-sd1"].to_dict(),
    {"preset": "sd-v1"},
    to_compvis_yaml(PRESETS["sdxl-base"]),  # sgm's layout
    PRESETS["tiny-sdxl"].to_dict(),
]


@FUZZ
@given(
    which=st.integers(0, 4),
    edits=st.lists(st.tuples(st.integers(0, 999), JSON), max_size=4),
    deletes=st.lists(st.integers(0, 999), max_size=2),
)
def test_edited_model_configs_in_both_layouts(which, edits, deletes):
    """Ours and the original CompVis inference YAML, with values replaced or keys removed anywhere; a config
    that parses also builds (on the meta device: the structure is checked, nothing is allocated)."""
    try:
        cfg = config_from_dict(_edited(VALID_MODEL_CONFIGS[which], edits, deletes))
    except ConfigError:
        event("refused with ConfigError")
        return
    event("parsed and built")
    with torch.device("meta"):
        LatentDiffusion(cfg)


TRAIN_KEYS = {
    "model": ["ckpt", "config", "parameterization"],
    "method": ["name", "down_ratio", "skips", "op", "kernel", "condition", "lora_rank"],
    "data": ["path", "resolution", "trigger", "caption_dropout", "condition_dir", "cache"],
    "optim": ["lr", "weight_decay", "eps", "batch_size", "grad_accum", "warmup_steps", "max_steps", "lr_schedule"],
    "validation": ["every", "prompts", "seeds", "steps", "scale", "control_images"],
}
SECTION = st.sampled_from(list(TRAIN_KEYS)).flatmap(
    lambda s: st.tuples(st.just(s), st.dictionaries(st.sampled_from(TRAIN_KEYS[s]), JSON, max_size=4))
)


@FUZZ
@given(
    sections=st.lists(SECTION, max_size=4),
    top=st.dictionaries(
        st.sampled_from(["precision", "seed", "log_every", "save_every", "keep_last", "noise_offset", "x"]),
        JSON,
        max_size=3,
    ),
    overrides=st.lists(st.text(max_size=12), max_size=2),
)
def test_arbitrary_training_configs(sections, top, overrides):
    data = {**top, **dict(sections)}
    path = WORK / "train.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except yaml.YAMLError:
        return
    try:
        load_train_config(path, overrides)
        event("parsed")
    except ConfigError:
        event("refused with ConfigError")


def test_the_fuzz_targets_accept_their_valid_inputs(tiny_model):
    """The valid seeds of the fuzzing above load (so the tests above exercise rejection, not a broken seed)."""
    path = WORK / "seed.ckpt"
    path.write_bytes(CKPT)
    sd, extras = read_checkpoint(path)
    assert set(sd) == {"a.weight", "a.view", "b", "c"} and extras["global_step"] == 7
    assert torch.equal(sd["a.view"], sd["a.weight"][1:3])
    path = WORK / "seed.safetensors"
    save_file(_tuner_weights(), str(path), metadata={"ldm_sce.tuner": json.dumps(GOOD)})
    assert len(load_tuner(tiny_model, path)) == 1
    from ldm_sce.lora import load_lora, lora_targets, remove_lora

    name = sorted(lora_targets(tiny_model))[0]
    w = lora_targets(tiny_model)[name].shape
    down = torch.full((2, *w[1:]), 0.1)
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": torch.full((w[0], 2), 0.1)},
        str(WORK / "l.safetensors"),
    )
    assert load_lora(tiny_model, WORK / "l.safetensors") == 1
    remove_lora(tiny_model)
    assert load_config({"preset": "tiny-sd1"}) == PRESETS["tiny-sd1"]
