"""Train an SC-Tuner (style), a CSC-Tuner (control) or the `full` baseline on a Stable Diffusion checkpoint.

    python tools/train.py --base configs/train/sd15_512_sce_t2i.yaml
    python tools/train.py --base configs/train/tiny_sc.yaml optim.lr=1e-4 optim.max_steps=200
    python tools/train.py --base configs/train/tiny_sc.yaml --resume latest
    torchrun --nproc_per_node 2 tools/train.py --base configs/train/tiny_sc.yaml   # DDP (gloo on CPU)

Writes to `output_dir`: checkpoints/step-N.pt (atomic, the last `keep_last` kept; `--resume latest`
continues exactly), log.jsonl (loss, lr, step time, memory), validation/step-N.png (grids from the
`validation` prompts and seeds) and the final tuner (sc_tuner.safetensors / csc_<condition>.safetensors),
loadable by `tools/txt2img.py --tuner` / `--control`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce.checkpoint_io import CheckpointError  # noqa: E402
from ldm_sce.config import ConfigError  # noqa: E402
from ldm_sce.images import ImageError, NonFiniteError  # noqa: E402
from ldm_sce.training import Trainer, TrainingError, load_train_config  # noqa: E402


def main(args: argparse.Namespace) -> None:
    # -- config: YAML plus key=value overrides, validated --
    cfg = load_train_config(args.base, args.overrides)

    # -- train, then export the tuner --
    trainer = Trainer(cfg, resume=args.resume, resume_force=args.resume_force)
    final = trainer.train()
    if torch.distributed.is_initialized():
        # the ranks leave together (rank 0 after its export): none closes its connections while another's are
        # still in use (a rank torn down early aborted at exit once under load: "terminate called ...")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if final is not None:
        print(f"wrote {final}")
        if trainer.data.bad:
            print(f"skipped {len(trainer.data.bad)} unreadable image(s); see the warnings above")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="training config YAML (configs/train/*.yaml)")
    p.add_argument("--resume", help="a checkpoint path, or 'latest' in output_dir/checkpoints")
    p.add_argument(
        "--resume-force",
        action="store_true",
        help="resume although the config differs from the checkpoint's in settings that change the run",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    args = p.parse_args()
    try:
        main(args)
    except (ConfigError, CheckpointError, ImageError, NonFiniteError, TrainingError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
