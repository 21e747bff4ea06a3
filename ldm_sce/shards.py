"""Streaming training data over tar shards in WebDataset's layout, for datasets too large to list, index or
cache in memory.

Layout: each shard is a plain `.tar` whose members are grouped into samples by key, the member's path up to
the first dot of its file name (`0001.jpg`, `0001.txt` -> sample `0001` with parts `jpg` and `txt`). A sample
needs one image part (jpg, jpeg, png, webp, bmp); its caption is the `txt` part (missing: empty), and a
precomputed control condition may come as a `cond.png` / `cond.jpg` part. `data.path` names the shards: a
`.tar` file, a folder of them, a glob (`shards/*.tar`) or WebDataset's braces (`shards/{000000..000999}.tar`).

Order, as WebDataset's `shardshuffle` + `shuffle(buffer)`: each epoch the shard list is permuted by
(seed, epoch) and split across all processes by global rank (`shards[rank::world]`; under `torchrun
--nnodes N --nproc-per-node P` the rank is global, so the N * P processes of all nodes read disjoint
shards), then each process streams its shards through a shuffle buffer seeded by (seed, epoch, rank). The
buffer holds references (shard, member offsets), never image bytes, so a process's memory does not grow
with the dataset or the buffer's images. Each process's stream is endless (epoch after epoch): no process
waits for another at an epoch's end, and an epoch is every sample once per process's shard share.

Batches: consecutive samples of the stream, or with aspect-ratio buckets the first `batch` samples that
fall into one bucket (each bucket fills its own queue; a batch is emitted when a queue is full; nothing is
dropped, queues carry over epochs). Everything is fixed by (seed, rank, world): a resumed run replays the
stream's references up to its step (reading tar headers, and image headers with buckets), then continues
exactly.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import ConfigError
from .images import IMAGE_EXTS

log = logging.getLogger(__name__)
IMAGE_PARTS = ("jpg", "jpeg", "png", "webp", "bmp")
COND_PARTS = ("cond.png", "cond.jpg")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shards(path: str) -> bool:
    """Whether `data.path` names tar shards (rather than an image folder or a metadata file)."""
    if not path:
        return False
    p = Path(path)
    if _BRACES.search(path) or any(ch in path for ch in "*?["):
        return True
    if p.is_file():
        return p.suffix == ".tar"
    if not (p.is_dir() and any(p.glob("*.tar"))):
        return False
    listed = (p / "metadata.jsonl").exists() or (p / "train.csv").exists()  # a folder of listed data wins
    return not listed and not any(x.suffix.lower() in IMAGE_EXTS for x in p.iterdir())


def shard_list(path: str) -> list[Path]:
    """The shard files `path` names (module docstring), sorted; ConfigError if there are none or one is missing."""
    m = _BRACES.search(path)
    if m:  # WebDataset's brace range, zero-padded as written
        lo, hi = m.group(1), m.group(2)
        names = [path[: m.start()] + str(n).zfill(len(lo)) + path[m.end() :] for n in range(int(lo), int(hi) + 1)]
        missing = [n for n in names if not Path(n).is_file()]
        if missing:
            raise ConfigError(f"data.path {path}: {len(missing)} shard(s) missing, e.g. {missing[:3]}")
        shards = [Path(n) for n in names]
    elif any(ch in path for ch in "*?["):
        shards = sorted(Path(n) for n in glob.glob(path) if n.endswith(".tar"))
    elif Path(path).is_dir():
        shards = sorted(Path(path).glob("*.tar"))
    else:
        shards = [Path(path)] if Path(path).is_file() else []
    if not shards:
        raise ConfigError(f"data.path {path}: no .tar shards found (a folder of .tar files, a glob or a brace range)")
    return shards


@dataclass(frozen=True)
class Sample:
    """A reference to one sample: its shard, key and the (offset, size) of each part in the shard."""

    shard: Path
    key: str
    parts: tuple[tuple[str, int, int], ...]  # (part name, data offset, size)
    epoch: int
    size: tuple[int, int] | None = None  # its aspect-ratio bucket (width, height), with buckets

    @property
    def uid(self) -> int:
        """A stable integer of (shard name, key): seeds the sample's random choices, whatever its position."""
        return int.from_bytes(hashlib.sha256(f"{self.shard.name}/{self.key}".encode()).digest()[:8], "little")

    def part(self, name: str) -> tuple[int, int] | None:
        return next(((o, n) for p, o, n in self.parts if p == name), None)

    def read(self, name: str) -> bytes | None:
        found = self.part(name)
        if found is None:
            return None
        offset, size = found
        with open(self.shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    @property
    def image_part(self) -> str | None:
        return next((p for p in IMAGE_PARTS if self.part(p) is not None), None)


def read_shard(shard: Path, epoch: int) -> Iterator[Sample]:
    """The samples of one shard in their stored order; a damaged shard ends with a warning, the samples read
    before the damage kept."""
    current: dict[str, tuple[str, int, int]] = {}
    key = None
    try:
        with tarfile.open(shard, "r:") as tar:
            while (member := tar.next()) is not None:  # headers only: tarfile seeks past the data
                tar.members = []  # tarfile keeps every header it read: drop them (memory flat in the shard size)
                if not member.isfile():
                    continue
                name = member.name
                slash = name.rfind("/")
                dot = name.find(".", slash + 1)
                if dot < 0:
                    continue
                k, part = name[:dot], name[dot + 1 :].lower()
                if k != key and key is not None:
                    yield Sample(shard, key, tuple(current.values()), epoch)
                    current = {}
                key = k
                current[part] = (part, member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("shard %s is damaged (%s): its remaining samples are skipped", shard, e)
    if key is not None and current:
        yield Sample(shard, key, tuple(current.values()), epoch)


class ShardStream:
    """This process's endless, deterministic stream of sample batches (module docstring).

    `batches()` yields lists of `batch` Samples; `bucket_of(sample)` -> its (width, height) bucket, or None
    if its image is unreadable (no buckets: None). Samples without an image part are skipped (counted in `skipped`)."""

    def __init__(
        self,
        shards: list[Path],
        *,
        batch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        buffer: int = 1000,
        bucket_of=None,
    ):
        if len(shards) < world:
            raise ConfigError(
                f"{len(shards)} shard(s) cannot be split across {world} processes: write at least one shard per "
                "process (more shards than processes balance better)"
            )
        self.shards, self.batch, self.seed, self.rank, self.world = shards, batch, seed, rank, world
        self.buffer, self.bucket_of = buffer, bucket_of
        self.skipped = 0

    def epoch_shards(self, epoch: int) -> list[Path]:
        """This process's shards in epoch `epoch`: the seeded permutation, split by rank."""
        order = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(self.shards))
        return [self.shards[k] for k in order[self.rank :: self.world]]

    def samples(self) -> Iterator[Sample]:
        """The shuffled samples, epoch after epoch (WebDataset's buffer shuffle: each incoming sample replaces
        a random one of the buffer, which is emitted)."""
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, self.rank, 0xB0FF])
            pool: list[Sample] = []
            found = False
            for shard in self.epoch_shards(epoch):
                for sample in read_shard(shard, epoch):
                    if sample.image_part is None:
                        if not self.skipped:
                            log.warning("skipping sample %s of %s: it has no image part", sample.key, shard)
                        self.skipped += 1  # logged by the trainer (`skipped_samples`)
                        continue
                    found = True
                    if len(pool) < self.buffer:
                        pool.append(sample)
                        continue
                    k = int(rng.integers(len(pool)))
                    yield pool[k]
                    pool[k] = sample
            for k in rng.permutation(len(pool)):
                yield pool[k]
            if not found:
                raise ConfigError(
                    f"process {self.rank}: its shards of epoch {epoch} hold no samples with an image part "
                    f"({', '.join(IMAGE_PARTS)}), e.g. {self.epoch_shards(epoch)[:3]}"
                )
            epoch += 1

    def batches(self) -> Iterator[list[Sample]]:
        if self.bucket_of is None:
            it = self.samples()
            while True:
                yield [next(it) for _ in range(self.batch)]
        queues: dict = {}
        for sample in self.samples():
            size = self.bucket_of(sample)
            if size is None:  # its image cannot be read: skipped
                continue
            queue = queues.setdefault(size, [])
            queue.append(replace(sample, size=size))
            if len(queue) == self.batch:
                yield queue
                queues[size] = []


def write_shards(items, out_dir: str | Path, per_shard: int = 1000, prefix: str = "shard") -> list[Path]:
    """Write (image file, caption[, condition image file]) items as tar shards in the layout above:
    `{prefix}-000000.tar`, ... with `per_shard` samples each (keys 000000000, ...), each written to a temporary
    name and renamed, so a shard is never seen half written. Returns the shard paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list(items)
    paths = []
    for s, start in enumerate(range(0, len(items), per_shard)):
        path = out / f"{prefix}-{s:06d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for k, item in enumerate(items[start : start + per_shard], start):
                image, caption, *cond = item
                image = Path(image)
                parts = [(image.suffix.lower().lstrip("."), image.read_bytes()), ("txt", caption.encode())]
                if cond and cond[0] is not None:
                    ext = "jpg" if Path(cond[0]).suffix.lower() in (".jpg", ".jpeg") else "png"
                    parts.append((f"cond.{ext}", Path(cond[0]).read_bytes()))
                for part, data in parts:
                    info = tarfile.TarInfo(f"{k:09d}.{part}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.replace(path)
        paths.append(path)
    return paths
