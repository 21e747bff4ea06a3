"""Text to image, with the CompVis `scripts/txt2img.py` arguments.

    python tools/txt2img.py --prompt "a large red circle"                  # the embedded toy model
    python tools/txt2img.py --ckpt weights/v1-5-pruned-emaonly.safetensors --prompt "a red bicycle"

Writes <outdir>/samples/NNNNN.png (one per image, seed + i) and <outdir>/grid-NNNN.png; every PNG carries
its parameters in a `parameters` text chunk (AUTOMATIC1111's convention), `--json` adds a sidecar.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce import cli  # noqa: E402
from ldm_sce.generate import txt2img, txt2img_parser  # noqa: E402


def main(args: argparse.Namespace) -> None:
    txt2img(args)
    print(f"Your samples are ready and waiting for you here: {args.outdir}")


def parser() -> argparse.ArgumentParser:
    return txt2img_parser(__doc__)


if __name__ == "__main__":
    cli.run_cli(main, parser())
