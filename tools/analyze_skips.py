"""The skip connections of a UNet as the SCEdit paper's figure 3 looks at them: remove skips progressively and
watch the decoder's output lose variance; per-skip statistics; with a tuner, how much it edits each skip.

    python tools/analyze_skips.py                          # the embedded toy model, its style tuner
    python tools/analyze_skips.py --ckpt weights/v1-5-pruned-emaonly.safetensors --tuner style.safetensors \\
        --prompt "a cat" --prompt "a house" --seeds 0 1 2 --out outputs/skips

For each prompt and seed, an image is generated with the base model; its latent is noised to each
`--timesteps` t, and the UNet runs on it with skips removed (zeroed before the concatenation): none, the
low-resolution half (decoder order: the first half), all, and each skip alone. Written to --out: `skips.json`
(every number), `variance.png` (the variance of the UNet's output per removal), `histogram.png` (its
histogram for none / half / all), `features.png` (channel-mean feature maps entering chosen decoder blocks),
`per_skip.png` (RMS of skip vs backbone at each block, the output change when that skip alone is removed,
and with a tuner ||T(s) - s|| / ||s||). Needs matplotlib (`pip install -e ".[analysis]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce import cli  # noqa: E402
from ldm_sce.sampling import sample  # noqa: E402
from ldm_sce.skip_edits import SkipEdit, SkipScale  # noqa: E402
from ldm_sce.tuner_files import load_tuner  # noqa: E402
from ldm_sce.tuners import SCTuner, SkipIdentity  # noqa: E402

TOY_PROMPTS = ["a red circle", "a large blue square", "a small green triangle", "a yellow diamond"]
TOY_TUNER = Path(__file__).resolve().parents[1] / "weights" / "toy-style-sc.safetensors"


class Record(SkipEdit):
    """Records, per decoder block, the RMS of h and of the skip entering it and h's channel mean."""

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict] = {}

    def forward(self, m, h, skip):
        self.rows[m] = {
            "h_rms": h.float().pow(2).mean().sqrt().item(),
            "skip_rms": skip.float().pow(2).mean().sqrt().item(),
            "h_mean_map": h.float().mean(dim=1)[0].cpu(),
        }
        return h, skip


def removals(n: int) -> dict[str, list[int]]:
    out = {"none": [], "half": list(range(n // 2)), "all": list(range(n))}
    out |= {f"skip {m}": [m] for m in range(n)}
    return out


@torch.no_grad()
def analyze(model, prompts, seeds, timesteps, steps, tuner_path=None) -> tuple[dict, dict]:
    """(numbers, maps): per removal the output variance and histogram values, per skip the statistics."""
    unet = model.model.diffusion_model
    n = len(unet.cfg.skip_channels)
    base_slots = [SkipIdentity() for _ in range(n)]
    tuned = load_tuner(model, tuner_path, kind="sc") if tuner_path else None
    tuner_slots = list(unet.tuners)
    unet.replace_tuners(base_slots)
    p = next(model.parameters())
    outputs = {name: [] for name in removals(n)}
    rec_rows: dict[int, list[dict]] = {m: [] for m in range(n)}
    edit_sizes: dict[int, list[float]] = {m: [] for m in range(n)}
    maps: dict[str, dict[int, torch.Tensor]] = {}
    size = model.cfg.native_size
    shape = model.cfg.latent_size(size, size)
    for prompt in prompts:
        c = model.get_learned_conditioning([prompt])
        uc = model.get_unconditional_conditioning(c)
        for seed in seeds:
            unet.skip_edits = torch.nn.ModuleList()  # the image itself: the base model, every skip in place
            z0 = sample(model, c, uc, steps=steps, seed=seed, shape=shape)
            for t in timesteps:
                g = torch.Generator().manual_seed(seed * 1000 + t)
                noise = torch.randn(z0.shape, generator=g).to(p.device, p.dtype)
                tt = torch.tensor([t], device=p.device)
                x_t = model.q_sample(z0, tt, noise)
                for name, dropped in removals(n).items():
                    rec = Record()
                    unet.skip_edits = torch.nn.ModuleList([SkipScale.dropping(dropped, n), rec])
                    out = model.apply_model(x_t, tt, c)
                    outputs[name].append(out.float().flatten().cpu())
                    if name == "none":
                        for m, row in rec.rows.items():
                            rec_rows[m].append(row)
                    if (
                        name in ("none", "half", "all")
                        and prompt == prompts[0]
                        and seed == seeds[0]
                        and t == timesteps[0]
                    ):
                        maps[name] = {m: row["h_mean_map"] for m, row in rec.rows.items()}
                if tuned is not None:  # how much the tuner edits each skip, on this input's skips
                    skips = _skips(model, x_t, tt, c)
                    for m, (skip, tuner) in enumerate(zip(skips, tuner_slots, strict=True)):
                        if isinstance(tuner, SCTuner):
                            edit = tuner(skip) - skip
                            edit_sizes[m].append((edit.norm() / skip.norm()).item())
    unet.skip_edits = torch.nn.ModuleList()
    unet.replace_tuners(tuner_slots if tuned is not None else base_slots)
    base = torch.cat(outputs["none"])
    numbers = {"removals": {}, "per_skip": []}
    for name, outs in outputs.items():
        o = torch.cat(outs)
        numbers["removals"][name] = {
            "dropped": removals(n)[name],
            "variance": o.var().item(),
            "std": o.std().item(),
            "change_rms": ((o - base).pow(2).mean().sqrt() / base.pow(2).mean().sqrt()).item(),
        }
    for m in range(n):
        rows = rec_rows[m]
        numbers["per_skip"].append(
            {
                "skip": m,
                "channels": unet.cfg.skip_channels[m],
                "skip_rms": sum(r["skip_rms"] for r in rows) / len(rows),
                "backbone_rms": sum(r["h_rms"] for r in rows) / len(rows),
                "output_change_when_removed": numbers["removals"][f"skip {m}"]["change_rms"],
                "tuner_edit_size": (sum(edit_sizes[m]) / len(edit_sizes[m])) if edit_sizes[m] else None,
            }
        )
    hist = {name: torch.cat(outputs[name]) for name in ("none", "half", "all")}
    return numbers, {"maps": maps, "hist": hist}


def _skips(model, x, t, c) -> list[torch.Tensor]:
    """The skips the decoder pops, in decoder order (recorded by a SkipEdit, so with no tuner on them)."""
    unet = model.model.diffusion_model
    seen = []

    class Grab(SkipEdit):
        def forward(self, m, h, skip):
            seen.append(skip)
            return h, skip

    slots = unet.replace_tuners([SkipIdentity() for _ in unet.tuners])
    unet.skip_edits = torch.nn.ModuleList([Grab()])
    model.apply_model(x, t, c)
    unet.skip_edits = torch.nn.ModuleList()
    unet.replace_tuners(slots)
    return seen


def plot(numbers: dict, extra: dict, out: Path, blocks: list[int]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rem = numbers["removals"]
    names = list(rem)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 3.2))
    ax.bar(range(len(names)), [rem[k]["variance"] for k in names], color=["C0", "C1", "C3"] + ["C7"] * (len(names) - 3))
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("variance of the UNet output")
    ax.set_title("skips removed: none, the low-resolution half, all, each alone")
    fig.tight_layout()
    paths.append(out / "variance.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, color in (("none", "C0"), ("half", "C1"), ("all", "C3")):
        ax.hist(extra["hist"][name].numpy(), bins=80, histtype="step", density=True, color=color, label=name)
    ax.set_xlabel("UNet output value")
    ax.set_ylabel("density")
    ax.legend(title="skips removed")
    fig.tight_layout()
    paths.append(out / "histogram.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    maps = extra["maps"]
    fig, axes = plt.subplots(3, len(blocks), figsize=(1.8 * len(blocks), 5.6), squeeze=False)
    for r, name in enumerate(("none", "half", "all")):
        for k, m in enumerate(blocks):
            axes[r][k].imshow(maps[name][m].numpy(), cmap="viridis")
            axes[r][k].set_xticks([])
            axes[r][k].set_yticks([])
            if r == 0:
                axes[r][k].set_title(f"into block {m}", fontsize=8)
        axes[r][0].set_ylabel(f"removed: {name}", fontsize=8)
    fig.suptitle("channel mean of h entering decoder blocks", fontsize=9)
    fig.tight_layout()
    paths.append(out / "features.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    per = numbers["per_skip"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ms = [row["skip"] for row in per]
    ax.plot(ms, [row["skip_rms"] / row["backbone_rms"] for row in per], "o-", label="RMS skip / RMS backbone")
    ax.plot(ms, [row["output_change_when_removed"] for row in per], "s-", label="output change when removed")
    if per[0]["tuner_edit_size"] is not None:
        ax.plot(ms, [row["tuner_edit_size"] or 0 for row in per], "^-", label="tuner edit ||T(s) - s|| / ||s||")
    ax.set_xlabel("skip (decoder order: low resolution first)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "per_skip.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(args: argparse.Namespace) -> None:
    cli.check_device(args.device)
    ckpt = args.ckpt or str(cli.DEFAULT_CKPT)
    tuner = args.tuner if args.tuner is not None else (str(TOY_TUNER) if args.ckpt is None else None)
    model = cli.load_model(ckpt, config=args.config, device=args.device)
    prompts = args.prompt or TOY_PROMPTS
    numbers, extra = analyze(model, prompts, args.seeds, args.timesteps, args.steps, tuner or None)
    n = len(numbers["per_skip"])
    blocks = args.blocks or sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers |= {"ckpt": ckpt, "tuner": tuner, "prompts": prompts, "seeds": args.seeds, "timesteps": args.timesteps}
    tmp = out / "skips.json.tmp"
    tmp.write_text(json.dumps(numbers, indent=2))
    tmp.replace(out / "skips.json")
    paths = plot(numbers, extra, out, blocks)
    rem = numbers["removals"]
    print("variance of the UNet output: " + ", ".join(f"{k} {rem[k]['variance']:.4f}" for k in ("none", "half", "all")))
    print(f"wrote {out / 'skips.json'} and {', '.join(p.name for p in paths)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="default: the embedded toy model (and its style tuner)")
    p.add_argument("--config")
    p.add_argument("--tuner", help="an SC-Tuner file: also its per-skip edit sizes ('' for none)")
    p.add_argument("--prompt", action="append", default=[], help="repeatable; default: four toy prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--timesteps", type=int, nargs="+", default=[250, 500, 750])
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the generated images")
    p.add_argument("--blocks", type=int, nargs="+", help="decoder blocks whose input feature maps to show")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="outputs/skips")
    cli.run_cli(main, p)
