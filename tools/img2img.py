"""Image to image (SDEdit) as the CompVis `scripts/img2img.py`: noise the encoded init image to
`strength` of the DDIM schedule, then denoise it with the prompt.

    python tools/img2img.py --ckpt weights/v1-5-pruned-emaonly.safetensors --init-img sketch.png \
        --strength 0.75 --prompt "a fantasy landscape, trending on artstation"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce import cli  # noqa: E402
from ldm_sce.generate import img2img, img2img_parser  # noqa: E402


def main(args: argparse.Namespace) -> None:
    img2img(args)
    print(f"Your samples are ready and waiting for you here: {args.outdir}")


def parser() -> argparse.ArgumentParser:
    return img2img_parser(__doc__)


if __name__ == "__main__":
    cli.run_cli(main, parser())
