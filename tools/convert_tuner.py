"""Convert an official SCEdit tuner or controller to this project's single-file format.

    python tools/convert_tuner.py 0_SwiftSCETuning/ my_style.safetensors --base sd1
    python tools/convert_tuner.py ldm_step-2000/pytorch_model.bin my_style.safetensors --base sd2
    python tools/convert_tuner.py canny_controller/ canny.safetensors --base sd2 --condition canny
    python tools/convert_tuner.py studio_export/ text_sce.safetensors --base sd1   # TEXT_SCE: both folders

Accepts a swift adapter folder (adapter_model.safetensors/.bin), a native scepter checkpoint
(pytorch_model.bin with model.lsc_identity.* keys), a released controller folder (pytorch_model.bin with
0.pre_hint_blocks.* keys; its configuration.json SCALE becomes the default control weight) or a scepter
Studio TEXT_SCE folder (0_SwiftSCETuning/ + 1_SwiftLoRA/: SC-Tuners and the text-encoder LoRA in one file).
The structure is read from the weights; --base records which model it is for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce.checkpoint_io import CheckpointError  # noqa: E402
from ldm_sce.conditions import CONDITIONS  # noqa: E402
from ldm_sce.tuner_files import convert_tuner  # noqa: E402


def main(args: argparse.Namespace) -> None:
    tf = convert_tuner(args.src, args.out, args.base, args.condition)
    n = sum(v.numel() for v in tf.state_dict.values())
    print(f"wrote {args.out}: {tf.kind} tuner, {len(tf.skips)} skips, {n:,} parameters, base {tf.base}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="official file or folder")
    p.add_argument("out", type=Path, help="output .safetensors")
    p.add_argument("--base", choices=("sd1", "sd2", "sdxl"), help="the base model family it was trained on")
    p.add_argument("--condition", choices=CONDITIONS, help="controller condition type (canny, color, ...)")
    args = p.parse_args()
    try:
        main(args)
    except (CheckpointError, FileExistsError) as e:
        print(f"convert_tuner.py: error: {e}", file=sys.stderr)
        sys.exit(2)
