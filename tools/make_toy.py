"""Build the embedded toy model (weights/toy-shapes.safetensors) from nothing: the shapes world, the VAE,
the initial checkpoint that `tools/train.py` trains with method `full`, and the shipped fp16 file.

    python tools/make_toy.py data --out data/toy                  # base sets, few-shot style set, eval set
    python tools/make_toy.py init --out outputs/toy/vae.safetensors                       # the VAE
    python tools/make_toy.py init --vae-init outputs/toy/vae.safetensors --varied 6000 --vae-steps 1000 \
        --out outputs/toy/init.safetensors                        # the VAE continued on random looks
    python tools/train.py --base configs/toy/base.yaml            # the UNet, from scratch (method full)
    python tools/train.py --base configs/toy/base_offset.yaml     # continued with offset noise
    python tools/make_toy.py ship outputs/toy/base_offset/model.safetensors weights/toy-shapes.safetensors

`init` trains the KL autoencoder (L1 reconstruction + KL 1e-6, the CompVis weighting without the LPIPS
and GAN terms, which a world of flat shapes does not need), measures `scale_factor` as 1 / std of its
latents (as the LDM paper does; the posterior's log-variance starts at -6 so the decoder first sees a clear
signal, instead of unit noise it takes thousands of steps to learn to remove), draws the text encoder at random (CLIP's init, seed 0; it stays frozen,
captions are learned by the UNet's cross-attention) and the UNet at random with the CompVis zero-init
of the output convolutions (`UNetModel.initialize_weights`), and writes the lot as one original-layout
checkpoint.
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

from ldm_sce import LatentDiffusion, toy  # noqa: E402
from ldm_sce.checkpoint_io import load_model, save_checkpoint  # noqa: E402
from ldm_sce.config import load_config  # noqa: E402

SETS = {  # name: (n, seed, write_dataset options)
    "base": (20000, 1, {}),  # the VAE's base-world images
    "tagged": (20000, 1, {"nonce": 0.2}),  # the UNet's: a fifth end in "<made-up word> style"
    "style": (30, 2, {"look": toy.STYLE_LOOK}),  # the few-shot `zqx` style
    "canny": (3000, 4, {}),
    "eval": (200, 3, {}),
}


def cmd_data(args: argparse.Namespace) -> None:
    for name, (n, seed, options) in SETS.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        toy.write_dataset(Path(args.out) / name, n, seed, **options)
        print(f"{name}: {n} images in {time.perf_counter() - start:.1f} s -> {Path(args.out) / name}")


def _images(folder: Path, limit: int | None = None) -> torch.Tensor:
    from PIL import Image

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()][:limit]
    arr = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _save_reconstructions(x: torch.Tensor, rec: torch.Tensor, path: Path) -> None:
    from ldm_sce.images import make_grid, to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(to_pil(torch.cat([x[:8], rec[:8].detach()])), n_cols=8).save(path)


def init_weights(model: LatentDiffusion, seed: int) -> None:
    """CLIP's init for the text tower (normal 0.02 tokens, 0.01 positions). The UNet has the CompVis init
    from its constructor (`UNetModel.initialize_weights`)."""
    torch.manual_seed(seed)
    emb = model.cond_stage_model.transformer.text_model.embeddings
    torch.nn.init.normal_(emb.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(emb.position_embedding.weight, std=0.01)


def cmd_init(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    cfg = load_config(args.config)
    model = LatentDiffusion(cfg)
    init_weights(model, args.seed)
    # The VAE is the general image codec: it learns the base world, the night look of the first style, and
    # with --varied random looks (bold patterns, outlines, night grounds), so that new styles can be drawn.
    rng = np.random.default_rng(args.seed + 100)
    scenes = [toy.random_scene(rng, night_outline=True) for _ in range(1500)]
    scenes += [toy.random_scene(rng, varied=1.0) for _ in range(args.varied)]
    drawn = np.stack([np.asarray(toy.render(s)) for s in scenes])
    drawn = torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    images = torch.cat([_images(Path(args.data), 6000), drawn])
    vae = model.first_stage_model.train().requires_grad_(True)
    if args.vae_init:  # continue from the VAE of an earlier `init` output
        vae.load_state_dict(load_model(args.vae_init).first_stage_model.state_dict())
    else:
        with torch.no_grad():  # start with a small posterior std (0.05) so the decoder first sees a clear signal
            vae.quant_conv.bias[cfg.vae.embed_dim :].fill_(-6.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.vae_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.vae_steps + 1):
        x = images[torch.randint(len(images), (args.batch,), generator=g)]
        post = vae.encode(x)
        rec = vae.decode(post.sample(generator=g))
        l1 = (rec - x).abs().mean()
        loss = l1 + 1e-6 * post.kl().mean() / x[0].numel()  # CompVis: sum-L1 + 1e-6 sum-KL, per pixel here
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            print(
                f"vae step {step}/{args.vae_steps} l1 {l1.item():.4f} logvar {post.logvar.mean().item():.2f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        if step % 250 == 0:
            _save_reconstructions(x, rec, Path(args.out).with_suffix(f".vae-{step}.png"))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        held = images[torch.randperm(len(images), generator=g)[:512]]
        z = torch.cat([vae.encode(b).sample(generator=g) for b in held.split(64)])
        rec = torch.cat([vae.decode(vae.encode(b).mean) for b in held.split(64)])
    scale = 1.0 / z.std().item()
    print(
        f"latent std {z.std().item():.4f} -> scale_factor {scale:.5f}; L1 on 512 images {(rec - held).abs().mean():.4f}"
    )
    model.cfg = cfg.replace(scale_factor=round(scale, 5))
    model.scale_factor = model.cfg.scale_factor
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out)
    print(f"wrote {args.out}")


def cmd_ship(args: argparse.Namespace) -> None:
    model = load_model(args.src)
    save_checkpoint(model, args.dst, dtype=torch.float16)
    print(f"wrote {args.dst} ({Path(args.dst).stat().st_size / 2**20:.1f} MiB, fp16)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the shapes datasets")
    d.add_argument("--out", default="data/toy")
    d.add_argument("--only", nargs="+", choices=sorted(SETS), help="write these sets only")
    i = sub.add_parser("init", help="train the VAE; write the initial checkpoint")
    i.add_argument("--data", default="data/toy/base")
    i.add_argument("--config", default="configs/toy/model.yaml")
    i.add_argument("--out", default="outputs/toy/init.safetensors")
    i.add_argument("--vae-steps", type=int, default=2500)  # the shipped model's
    i.add_argument("--batch", type=int, default=8)
    i.add_argument("--lr", type=float, default=1e-3)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument(
        "--varied",
        type=int,
        default=0,
        help="add this many scenes of random looks (bold patterns, "
        "outlines, night backgrounds) to the VAE's training images",
    )
    i.add_argument("--vae-init", help="start the VAE from this checkpoint's VAE (a longer schedule in parts)")
    s = sub.add_parser("ship", help="fp16 copy of a trained checkpoint, config in its metadata")
    s.add_argument("src")
    s.add_argument("dst")
    args = p.parse_args()
    {"data": cmd_data, "init": cmd_init, "ship": cmd_ship}[args.cmd](args)


if __name__ == "__main__":
    main()
