"""Streaming training over tar shards (WebDataset's layout, `ldm_sce/shards.py`): the layout read as
WebDataset groups it, the shards split across processes, a deterministic shuffle that uses every sample once
per epoch, bitwise resume with buckets + EMA + the disk cache, and damaged input handled."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from helpers import train_config as write_config
from PIL import Image
from safetensors.torch import load_file

from ldm_sce import ConfigError
from ldm_sce.conditions import condition_tensor, make_condition
from ldm_sce.data import scan
from ldm_sce.shards import ShardStream, is_shards, read_shard, shard_list, write_shards
from ldm_sce.training import Trainer, load_train_config


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """24 portrait, landscape and square images with captions, in 6 shards of 4 samples."""
    root = tmp_path_factory.mktemp("photo_shards")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for k in range(24):
        w, h = [(64, 32), (32, 64), (40, 40)][k % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{k:02d}.png")
        (root / "images" / f"{k:02d}.txt").write_text(f"photo {k}, outdoors, tag{k % 5}")
    items = [(i.image, i.caption) for i in scan(root / "images")]
    write_shards(items, root / "shards", per_shard=4)
    return root


def test_make_shards_tool_writes_every_sample_with_its_caption_and_condition(photo_shards, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "make_shards.py"
    images = photo_shards / "images"
    cmd = [sys.executable, str(tool), str(images), str(tmp_path / "s"), "--per-shard", "10"]
    r = subprocess.run([*cmd, "--condition-dir", str(images)], capture_output=True, text=True)
    assert r.returncode == 0 and "24 samples in 3 shard(s)" in r.stdout, r.stderr
    samples = [s for shard in shard_list(str(tmp_path / "s")) for s in read_shard(shard, 0)]
    assert len(samples) == 24
    for sample, item in zip(samples, scan(images), strict=True):
        assert sample.read("png") == item.image.read_bytes() == sample.read("cond.png")
        assert sample.read("txt").decode() == item.caption
    r = subprocess.run([*cmd, "--condition-dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "lacks 24 condition map(s)" in r.stderr


def test_csc_streams_the_precomputed_condition_part(tiny_ckpts, photo_shards, tmp_path):
    """A CSC-Tuner without method.condition reads each sample's `cond` part (here the image itself)."""
    shards = tmp_path / "s"
    write_shards([(i.image, i.caption, i.image) for i in scan(photo_shards / "images")], shards, per_shard=5)
    cfg = load_train_config(shard_config(tmp_path, tiny_ckpts["sd1"][1], photo_shards, data={"path": str(shards)}))
    cfg.method.name = "csc"
    trainer = Trainer(cfg)
    batch = trainer._prepare(0)
    sample = trainer._stream_batch(0)[0]  # the same batch again (the stream replays from the start)
    item = trainer.data.from_shard(sample, sample.size)
    assert torch.equal(batch["cond"][0], item["cond"])
    h, w = item["image"].shape[1:]
    ch, cw = trainer.model.cfg.condition_size(h, w)
    cond = make_condition("raw", Image.open(io.BytesIO(sample.read("cond.png"))).convert("RGB"), cw, ch)
    assert torch.equal(item["cond"], condition_tensor(cond)[0])


def test_layout_names_and_grouping(photo_shards, tmp_path):
    shards = photo_shards / "shards"
    assert len(shard_list(str(shards))) == 6
    assert shard_list(str(shards / "shard-{000001..000003}.tar")) == [shards / f"shard-00000{k}.tar" for k in (1, 2, 3)]
    assert shard_list(str(shards / "*.tar")) == shard_list(str(shards))
    assert is_shards(str(shards)) and is_shards(str(shards / "shard-000000.tar")) and is_shards(str(shards / "*.tar"))
    assert not is_shards(str(photo_shards / "images")) and not is_shards("")
    with pytest.raises(ConfigError, match="1 shard.s. missing"):
        shard_list(str(shards / "shard-{000004..000006}.tar"))
    samples = list(read_shard(shards / "shard-000001.tar", epoch=0))
    assert [s.key for s in samples] == [f"{k:09d}" for k in range(4, 8)]
    assert all({p for p, _, _ in s.parts} == {"png", "txt"} for s in samples)
    assert samples[0].read("txt") == b"photo 4, outdoors, tag4"
    assert samples[0].read("png") == (photo_shards / "images" / "04.png").read_bytes()
    # WebDataset's key: the path up to the first dot of the file name (folders kept, extensions like cond.png)
    path = tmp_path / "nested.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a/x.1.jpg", b"J"), ("a/x.1.txt", b"T"), ("a/x.1.cond.png", b"C"), ("b.txt", b"only")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    first, second = read_shard(path, 0)
    assert first.key == "a/x" and {p for p, _, _ in first.parts} == {"1.jpg", "1.txt", "1.cond.png"}
    assert second.key == "b" and second.image_part is None


def test_shards_are_split_across_processes_and_each_sample_used_once_per_epoch(photo_shards):
    shards = shard_list(str(photo_shards / "shards"))
    streams = [ShardStream(shards, batch=2, seed=3, rank=r, world=2, buffer=3) for r in (0, 1)]
    for epoch in (0, 1):
        mine = [set(s.epoch_shards(epoch)) for s in streams]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(shards)  # disjoint, together all
    for s in streams:
        it = s.samples()
        epoch0 = [next(it) for _ in range(12)]  # 3 shards x 4 samples per process
        epoch1 = [next(it) for _ in range(12)]
        keys = [x.key for x in epoch0]
        assert len(set(keys)) == 12 and {x.shard for x in epoch0} == set(s.epoch_shards(0))
        assert {x.epoch for x in epoch0} == {0} and {x.epoch for x in epoch1} == {1}
        assert keys != sorted(keys)  # shuffled
        again = s.samples()
        assert [next(again).key for _ in range(12)] == keys  # fixed by (seed, rank)
    with pytest.raises(ConfigError, match="6 shard.s. cannot be split across 8 processes"):
        ShardStream(shards, batch=1, world=8, rank=0)


def shard_config(tmp_path, ckpt, photo_shards, **extra):
    data = {"path": str(photo_shards / "shards"), "resolution": 48, "buckets": True, "min_bucket_reso": 16}
    data |= {"max_bucket_reso": 64, "bucket_reso_steps": 16, "shuffle_buffer": 5, "shuffle_caption": True}
    data |= extra.pop("data", {})
    return write_config(tmp_path, ckpt, photo_shards, data=data, optim={"batch_size": 2, "max_steps": 4}, **extra)


def test_streaming_training_buckets_resume_bitwise(tiny_ckpts, photo_shards, tmp_path):
    """Streamed with buckets + EMA, straight and resumed with the disk cache on: the same tuner, bitwise;
    every batch one bucket; the decoded images those of the files the shards were written from."""
    ckpt = tiny_ckpts["sd1"][1]
    ema = {"decay": 0.8, "start_step": 1}
    a = tmp_path / "a"
    a.mkdir()
    trainer = Trainer(load_train_config(shard_config(a, ckpt, photo_shards, ema=ema)))
    assert trainer.stream is not None and trainer.data.items == []
    batches = [trainer._stream_batch(m) for m in range(6)]
    assert all(len(b) == 2 and len({s.size for s in b}) == 1 for b in batches)
    assert {b[0].size for b in batches} <= {(32, 64), (48, 48), (64, 32)}
    folder = scan(photo_shards / "images")
    sample = batches[0][0]
    item = trainer.data.from_shard(sample, sample.size)
    k = int(sample.key)
    trainer.data.sizes = [sample.size] * len(folder)
    trainer.data.items = folder
    assert torch.equal(item["image"], trainer.data[(0, k)]["image"])  # same pixels as from the image file
    trainer = Trainer(load_train_config(shard_config(a, ckpt, photo_shards, ema=ema)))
    shapes = {tuple(trainer._prepare(m)["x_t"].shape[2:]) for m in range(8)}
    assert len(shapes) > 1 and shapes <= {(32, 16), (24, 24), (16, 32)}
    trainer.train()
    b = tmp_path / "b"
    b.mkdir()
    cfg = load_train_config(
        shard_config(b, ckpt, photo_shards, data={"cache_dir": str(tmp_path / "cache")}, ema=ema, save_every=2)
    )
    cfg.optim.max_steps = 2
    Trainer(cfg).train()
    cfg.optim.max_steps = 4
    resumed = Trainer(cfg, resume="latest")
    resumed.train()
    x, y = load_file(a / "out" / "sc_tuner.safetensors"), load_file(b / "out" / "sc_tuner.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_damaged_shards_and_settings(tiny_ckpts, photo_shards, tmp_path, caplog):
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(photo_shards / "shards", data)
    raw = (data / "shard-000002.tar").read_bytes()
    (data / "shard-000002.tar").write_bytes(raw[: len(raw) // 2])  # cut in the middle of a member
    kept = list(read_shard(data / "shard-000002.tar", 0))
    assert 1 <= len(kept) < 4 and "is damaged" in caplog.text
    (data / "shard-000003.tar").write_bytes(b"not a tar file")
    ckpt = tiny_ckpts["sd1"][1]
    cfg = load_train_config(shard_config(tmp_path, ckpt, photo_shards, data={"path": str(data)}))
    cfg.optim.max_steps = 3
    trainer = Trainer(cfg)
    assert trainer.train().is_file()  # trains on what is readable
    with tarfile.open(data / "shard-000004.tar", "a") as tar:  # a sample with a caption but no image
        info = tarfile.TarInfo("lonely.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"text"))
    stream = ShardStream(shard_list(str(data)), batch=1, buffer=2)
    epoch0 = []
    for x in stream.samples():
        if x.epoch:
            break
        epoch0.append(x)
    assert len(epoch0) == 4 * 4 + len(kept)  # shards 0, 1, 4, 5 whole, 2 cut, 3 unreadable
    assert stream.skipped == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert all(r["skipped_samples"] == 0 for r in rows if "loss" in r)
    (tmp_path / "c").mkdir()
    with pytest.raises(ConfigError, match="data.cache_dir .on disk. instead"):
        Trainer(load_train_config(shard_config(tmp_path / "c", ckpt, photo_shards, data={"cache": True})))


@pytest.mark.slow
def test_streaming_under_torchrun_two_processes(tiny_ckpts, photo_shards, tmp_path):
    """Two processes each stream their own shards (disjoint, by global rank); DDP keeps the replicas equal
    (the trainer checks them bitwise before rank 0 exports) and the run finishes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = shard_config(tmp_path, tiny_ckpts["sd1"][1], photo_shards)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run(
        [*cmd, str(root / "tools" / "train.py"), "--base", str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "out" / "log.jsonl").read_text()
    assert '"ranks_agree": true' in log and '"world_size": 2' in log
    assert (tmp_path / "out" / "sc_tuner.safetensors").is_file()
