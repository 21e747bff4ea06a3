"""`bench.py stream`: peak memory and step time of training streamed from tar shards, as the dataset grows.

Writes N synthetic 64x64 caption-image samples (JPEG, a coloured square on grey) as shards of `--per-shard`,
for each N of `--samples`, then trains the embedded toy model's SC-Tuners on them for `--steps` steps
(`tools/train.py`, one process per run so peaks do not mix) and reads the peak resident set and the step
times from the run's log. A map-style run over the same number of images would list them all (and with
`data.cache` hold every latent and text feature in memory); the stream holds only its shuffle buffer of
references.

    python tools/bench.py stream --samples 1000,10000,100000 --steps 30
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def add_arguments(p) -> None:
    p.add_argument("--samples", default="1000,10000,100000", help="dataset sizes, comma-separated")
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--buffer", type=int, default=1000, help="data.shuffle_buffer")
    p.add_argument("--json", type=Path)


def write_synthetic_shards(out: Path, n: int, per_shard: int, seed: int = 0) -> int:
    """n samples `key.jpg` + `key.txt` in shards of per_shard; returns the bytes written."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    names = list(COLORS)
    for s, start in enumerate(range(0, n, per_shard)):
        with tarfile.open(out / f"{s:06d}.tar", "w") as tar:
            for k in range(start, min(n, start + per_shard)):
                name = names[k % 4]
                arr = np.full((64, 64, 3), 128, np.uint8)
                x, y = rng.integers(0, 32, 2)
                arr[y : y + 32, x : x + 32] = COLORS[name]
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=90)
                for part, data in (("jpg", buf.getvalue()), ("txt", f"a {name} square zqx style".encode())):
                    info = tarfile.TarInfo(f"{k:09d}.{part}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        total += (out / f"{s:06d}.tar").stat().st_size
    return total


def run(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-sce-stream-") as tmp:
        for n in (int(x) for x in args.samples.split(",")):
            shards = Path(tmp) / f"n{n}"
            start = time.perf_counter()
            size = write_synthetic_shards(shards, n, args.per_shard)
            written = time.perf_counter() - start
            out = Path(tmp) / f"out{n}"
            cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--base", str(ROOT / "configs/toy/style_sc.yaml")]
            cmd += [f"data.path={shards}", "data.cache=false", f"data.shuffle_buffer={args.buffer}"]
            cmd += [f"optim.max_steps={args.steps}", f"optim.batch_size={args.batch}", "validation.prompts=[]"]
            cmd += ["log_every=1", f"output_dir={out}", "save_every=0"]
            start = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - start
            if r.returncode:
                raise SystemExit(f"training on {n} samples failed:\n{r.stderr[-3000:]}")
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            steps = [row for row in log if "step_time" in row]
            row = {
                "samples": n,
                "shards": -(-n // args.per_shard),
                "dataset_mb": size / 2**20,
                "write_seconds": written,
                "peak_rss_mb": max(row["max_rss_mb"] for row in steps),
                "first_step_seconds": steps[0]["step_time"],
                "median_step_seconds": statistics.median(row["step_time"] for row in steps[1:]),
                "run_wall_seconds": wall,
            }
            rows.append(row)
            print(
                f"  {n:8d} samples in {row['shards']:5d} shards ({row['dataset_mb']:7.1f} MB): peak RSS "
                f"{row['peak_rss_mb']:6.0f} MB, median step {row['median_step_seconds']:.3f} s, run {wall:.1f} s"
            )
    result = {"bench": "stream", "steps": args.steps, "batch": args.batch, "buffer": args.buffer, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result
