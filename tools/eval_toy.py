"""Score the toy model and its tuners by image analysis (no pretrained network): prompt accuracy, style
adherence, canny control fidelity. Prints a markdown table (the one in docs/RESULTS.md) and writes JSON.

    python tools/eval_toy.py                      # the shipped files in weights/
    python tools/eval_toy.py --lora outputs/toy/style_lora/lora.safetensors --samples outputs/toy/eval

- prompt accuracy: the fixed 50 prompts of `toy.eval_prompts()` (seed = prompt index); an image counts
  when the analysed shape has the asked colour and kind;
- style: the same prompts followed by the trigger ` zqx style`; adherence = fraction of images with the
  style's fine "/" stripes (`toy.style_adherence`); prompt accuracy is measured on the same images;
- control: 50 held-out scenes (seed 3); the condition is the canny map of the scene, the prompt names
  only its colour and kind ("a red circle"), so placement and size come from the control alone. Edge F1
  (1-pixel tolerance) between the scene's canny edges and the output's, with and without the controller.
Sampling: DDIM 25 steps, guidance 5, as `toy.SAMPLING`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce import toy  # noqa: E402
from ldm_sce.checkpoint_io import load_model  # noqa: E402
from ldm_sce.conditions import condition_tensor, make_condition  # noqa: E402
from ldm_sce.diffusion import LatentDiffusion  # noqa: E402
from ldm_sce.images import make_grid  # noqa: E402
from ldm_sce.lora import load_lora  # noqa: E402
from ldm_sce.skip_edits import FREEU_PRESETS, FreeU  # noqa: E402
from ldm_sce.tuner_files import load_tuner  # noqa: E402
from ldm_sce.tuners import Control, CSCTuner  # noqa: E402


def control_scenes(n: int = 50, seed: int = 3) -> list[toy.Scene]:
    rng = np.random.default_rng(seed)
    return [toy.random_scene(rng) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="weights/toy-shapes.safetensors")
    p.add_argument("--style-tuner", default="weights/toy-style-sc.safetensors")
    p.add_argument("--canny", default="weights/toy-canny-csc.safetensors")
    p.add_argument("--lora", help="a LoRA style tuner trained with the same budget (tools/train.py method lora)")
    p.add_argument("--json", default="outputs/toy/eval.json")
    p.add_argument("--samples", help="save a grid of each row's images here")
    p.add_argument(
        "--freeu", help="also rows with FreeU: a preset (sd1, sd2, sdxl) or B1,B2,S1,S2 (official block rule)"
    )
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()

    prompts = toy.eval_prompts()
    texts, expected = [p for p, _, _ in prompts], [(c, k) for _, c, k in prompts]
    seeds = list(range(len(prompts)))
    styled = [t + toy.STYLE_TRIGGER for t in texts]
    scenes = control_scenes()
    ctrl_texts = [f"a {s.colour} {s.kind}" for s in scenes]
    ctrl_expected = [(s.colour, s.kind) for s in scenes]
    refs = [toy.render(s) for s in scenes]
    ref_edges = [toy.edges(r) for r in refs]
    rows, grids = [], {}

    def row(name: str, params: int, model: LatentDiffusion, ctrl: CSCTuner | None = None) -> dict:
        out = {"model": name, "trainable_params": params}
        images = toy.generate(model, texts, seeds)
        out.update({f"prompt_{k}": v for k, v in toy.prompt_scores(images, expected).items()})
        out["style_without_trigger"] = toy.style_adherence(images)
        styled_images = toy.generate(model, styled, seeds)
        out["style_adherence"] = toy.style_adherence(styled_images)
        out["style_prompt_accuracy"] = toy.prompt_scores(styled_images, expected)["accuracy"]
        grids[name] = images[:10] + styled_images[:10]
        if ctrl is not None:  # conditions at the model's condition size, as the CLI and the trainer make them
            cond = torch.cat([condition_tensor(make_condition("canny", r, *cond_size)) for r in refs])
            hints = ctrl.hints(cond)
            images = toy.generate(model, ctrl_texts, seeds, control=lambda sl: Control([[h[sl] for h in hints]], [1.0]))
            grids[name] += images[:10]
        else:
            images = toy.generate(model, ctrl_texts, seeds)
        out["edge_f1"] = float(
            np.mean([toy.edge_f1(toy.edges(im), e) for im, e in zip(images, ref_edges, strict=True)])
        )
        out["control_prompt_accuracy"] = toy.prompt_scores(images, ctrl_expected)["accuracy"]
        rows.append(out)
        print(json.dumps(out), flush=True)
        return out

    base = load_model(args.ckpt)
    height, width = base.cfg.condition_size(toy.RES, toy.RES)
    cond_size = (width, height)  # make_condition's order
    row("base", 0, base)
    if args.style_tuner and Path(args.style_tuner).is_file():
        model = load_model(args.ckpt)
        load_tuner(model, args.style_tuner)
        row("base + SC-Tuner (style)", sum(p.numel() for p in model.model.diffusion_model.tuners.parameters()), model)
    if args.lora and Path(args.lora).is_file():
        model = load_model(args.ckpt)
        load_lora(model, args.lora)
        from ldm_sce.checkpoint_io import read_checkpoint

        params = sum(t.numel() for t in read_checkpoint(args.lora)[0].values())
        row("base + LoRA (style)", params, model)
    if args.canny and Path(args.canny).is_file():
        model = load_model(args.ckpt)
        ctrl = load_tuner(model, args.canny)
        row("base + CSC-Tuner (canny)", sum(p.numel() for p in ctrl.parameters()), model, ctrl)
    if args.freeu:
        values = FREEU_PRESETS.get(args.freeu) or tuple(float(v) for v in args.freeu.split(","))
        for name, tuner in (("base + FreeU", None), ("base + SC-Tuner (style) + FreeU", args.style_tuner)):
            model = load_model(args.ckpt)
            if tuner:
                load_tuner(model, tuner)
            unet = model.model.diffusion_model
            unet.skip_edits.append(FreeU(unet.cfg, *values))
            row(f"{name} {args.freeu}", sum(p.numel() for p in unet.tuners.parameters()), model)

    print(
        f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s; DDIM {toy.SAMPLING['steps']} steps, "
        f"guidance {toy.SAMPLING['scale']}\n"
    )
    print(
        "| model | trainable params | prompt accuracy (colour, kind) | style adherence | prompt accuracy with "
        "trigger | style without trigger | edge F1 | prompt accuracy under control |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['trainable_params']:,} | {r['prompt_accuracy']:.0%} ({r['prompt_colour']:.0%}, "
            f"{r['prompt_kind']:.0%}) | {r['style_adherence']:.0%} | {r['style_prompt_accuracy']:.0%} | {r['style_without_trigger']:.0%} | "
            f"{r['edge_f1']:.3f} | {r['control_prompt_accuracy']:.0%} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.samples:
        Path(args.samples).mkdir(parents=True, exist_ok=True)
        for name, images in grids.items():
            make_grid(images, n_cols=10).save(Path(args.samples) / f"{name.split(' (')[0].replace(' + ', '-')}.png")


if __name__ == "__main__":
    main()
