"""Write a training dataset (any layout `data.path` reads: a captioned image folder with `N_name/` repeats,
train.csv, metadata.jsonl) as tar shards in WebDataset's layout, for streaming (`ldm_sce/shards.py`):

    python tools/make_shards.py data/my_photos shards/my_photos --per-shard 1000
    python tools/train.py --base configs/train/sd15_512_sce_t2i.yaml data.path=shards/my_photos

`--condition-dir`: precomputed condition maps (same file names) stored as each sample's `cond` part.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce.config import ConfigError  # noqa: E402
from ldm_sce.data import scan  # noqa: E402
from ldm_sce.shards import write_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="the dataset (as data.path)")
    p.add_argument("out", help="folder for the shards")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--condition-dir", help="precomputed condition maps with the images' file names")
    args = p.parse_args(argv)
    if args.per_shard < 1:
        p.error("--per-shard must be at least 1")
    try:
        items = scan(args.data, args.caption_extension)
        conds = [Path(args.condition_dir) / i.image.name if args.condition_dir else None for i in items]
        missing = [str(c) for c in conds if c is not None and not c.is_file()]
        if missing:
            raise ConfigError(f"--condition-dir lacks {len(missing)} condition map(s), e.g. {missing[:3]}")
        shards = write_shards(
            [(i.image, i.caption, c) for i, c in zip(items, conds, strict=True)], args.out, args.per_shard
        )
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(items)} samples in {len(shards)} shard(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
