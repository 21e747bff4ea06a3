"""Aspect-ratio buckets (kohya's sd-scripts semantics): train on photos of any shape without cropping them to
a square.

- Buckets (`make_buckets`): every (width, height) with sides multiples of `step` between `min_side` and
  `max_side` and area at most resolution^2, each side as large as that area allows for the other (kohya's
  `make_bucket_resolutions`), plus the square.
- An image goes to the bucket whose aspect ratio is closest to its own (`assign`); it is resized to cover the
  bucket and center-cropped (the crop and the original size are what SDXL conditions on). With `no_upscale`,
  an image smaller than the bucket area gets a bucket of its own size rounded down to `step` instead, so it is
  never enlarged (kohya's `bucket_no_upscale`).
- Batches (`epoch_batches`): each bucket's images in a seeded random order, cut into global batches of the
  batch size, the batches of all buckets in a seeded random order: every batch has one shape, every image is
  used in every epoch, and a bucket's last batch is filled up with images of the same bucket drawn again
  (every batch has the global batch size, which DDP's equal shares need). Fixed by (seed, epoch): resumable
  from the step count alone, the same on any number of processes.
"""

from __future__ import annotations

import math

import numpy as np

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, min_side: int = 256, max_side: int = 1024, step: int = 64) -> list[Size]:
    """The bucket sizes (width, height) for `resolution`^2 pixels at most, sorted."""
    max_area = resolution * resolution
    sizes = {(resolution // step * step,) * 2}
    width = min_side
    while width <= max_side:
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
        width += step
    return sorted(sizes)


def assign(size: Size, buckets: list[Size], resolution: int, step: int = 64, no_upscale: bool = False) -> Size:
    """The bucket (width, height) of an image of `size` (width, height)."""
    w, h = size
    if no_upscale and w * h <= resolution * resolution:
        if w >= step and h >= step:
            return (w - w % step, h - h % step)
    ratios = np.array([bw / bh for bw, bh in buckets])
    return buckets[int(np.abs(ratios - w / h).argmin())]


def batches_per_epoch(buckets_of: list[Size], batch_size: int) -> int:
    """How many global batches an epoch has: the sum over buckets of ceil(images / batch size)."""
    counts: dict[Size, int] = {}
    for bucket in buckets_of:
        counts[bucket] = counts.get(bucket, 0) + 1
    return sum(math.ceil(n / batch_size) for n in counts.values())


def epoch_batches(buckets_of: list[Size], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of an epoch: lists of `batch_size` item indices, all of one bucket (module doc)."""
    rng = np.random.default_rng([seed, epoch, 0xB0C4])
    groups: dict[Size, list[int]] = {}
    for i, bucket in enumerate(buckets_of):
        groups.setdefault(bucket, []).append(i)
    batches = []
    for bucket in sorted(groups):
        order = [groups[bucket][k] for k in rng.permutation(len(groups[bucket]))]
        n = math.ceil(len(order) / batch_size) * batch_size
        filled = [order[k % len(order)] for k in range(n)]  # the last batch filled from the bucket's start
        batches += [filled[k : k + batch_size] for k in range(0, n, batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]
