"""Training SC-Tuners, CSC-Tuners (and the `full` baseline) on a frozen Stable Diffusion.

`TrainConfig` is plain data read from YAML (unknown keys are errors that name them). `Trainer` runs the loop:
the VAE and text encoder under no_grad; the frozen UNet records no autograd graph before the first tuner
(the encoder and middle block hold no trainable parameter and see no input that needs a gradient); MSE on
eps or v per the base model; AdamW; fp32 / bf16 / fp16 autocast with fp32 trainable weights (and a grad
scaler for fp16); atomic checkpoints with exact resume; DistributedDataParallel under torchrun.

Randomness (data order, caption dropout, timesteps, noise, posterior samples) is drawn from generators
seeded by (seed, step, sample index in the global batch): a run is reproducible and resumable from its
step count alone, and any split of the global batch over processes sees the same samples and noise.

Nothing is lost or made silently: every file the config names is checked before the model is loaded and
every image before step 1; a fresh run refuses an output_dir holding another run's checkpoints; a loss or
a weight that is not finite stops the run and exports nothing; the result is exported before the final
validation images are made; a resumed run states what differs from the config it was saved with and
refuses changes that break its exactness unless forced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import resource
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .buckets import assign, batches_per_epoch, epoch_batches, make_buckets
from .cache import DiskCache, sha256
from .checkpoint_io import CheckpointError, load_model
from .config import ConfigError
from .data import TrainDataset, collate, scan
from .diffusion import Cond, LatentDiffusion
from .images import ImageError, image_size, load_image
from .methods import Method, build_method
from .shards import Sample, ShardStream, is_shards, shard_list
from .train_config import OptimSection, TrainConfig, config_changes, load_train_config
from .unet import compile_unet

__all__ = ["OptimSection", "TrainConfig", "Trainer", "TrainingError", "load_train_config", "lr_factor"]

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (a loss that is not finite, an unusable dataset): nothing is exported."""


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


class TrainStep(nn.Module):
    """The differentiable part of a step, as one module (DDP wraps it): latents, text features and
    condition images in, loss out."""

    def __init__(self, model: LatentDiffusion, method: Method, min_snr_gamma: float = 0.0):
        super().__init__()
        self.model, self.method, self.min_snr_gamma = model, method, min_snr_gamma

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        c: torch.Tensor,
        target: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.model.apply_model(x_t, t, c, self.method.tuning(cond))
        if not self.min_snr_gamma:
            return F.mse_loss(out.float(), target.float())
        per_sample = (out.float() - target.float()).pow(2).mean(dim=list(range(1, out.ndim)))  # [B]
        return (min_snr_weights(self.model, t, self.min_snr_gamma) * per_sample).mean()


def min_snr_weights(model: LatentDiffusion, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) per sample: min(SNR_t, gamma) / SNR_t for eps prediction, and
    min(SNR_t, gamma) / (SNR_t + 1) for v (the v loss is the eps loss times SNR + 1), SNR_t = a_t / (1 - a_t)."""
    a = model.alphas_cumprod.to(t.device, torch.float64)[t]
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    return (clipped / (snr + 1 if model.parameterization == "v" else snr)).float()


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None, resume_force: bool = False):
        self.cfg = cfg
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device(
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before NCCL starts: each rank on its own GPU, from the first call
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if cfg.optim.batch_size % self.world:
            raise ConfigError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by {self.world} processes")
        self.out = Path(cfg.output_dir)
        state = self._read_resume(self._resolve_resume(resume), resume_force) if resume else None
        self._check_files(fresh=state is None)
        torch.manual_seed(cfg.seed)

        # -- model and trainable parameters (methods.py) --
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.model.dtype]
        self.model = load_model(
            cfg.model.ckpt, cfg.model.config, cfg.model.parameterization, dtype=dtype, device=self.device
        )
        if cfg.zero_terminal_snr:
            try:
                self.model.set_zero_terminal_snr()
            except ValueError as e:
                raise ConfigError(f"zero_terminal_snr: {e}; for a v model, set model.parameterization=v") from None
        self.model.first_stage_model.float()  # the VAE encodes in fp32 (SDXL's overflows in fp16)
        multiple = self.model.cfg.image_multiple
        if cfg.data.resolution % multiple:
            raise ConfigError(f"data.resolution {cfg.data.resolution}: this model takes multiples of {multiple}")
        unet = self.model.model.diffusion_model
        self.method = build_method(cfg.method)
        self.params = self.method.attach(unet)
        try:
            text_params = self.method.attach_text(self.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.trains_text = bool(text_params)
        if self.trains_text and cfg.data.cache:
            raise ConfigError("data.cache keeps text features fixed: it cannot be used with method.text_lora_rank")
        self.params += text_params
        unet.checkpoint_decoder = cfg.gradient_checkpointing
        compile_unet(unet, cfg.compile)
        self._posteriors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # data.cache: item -> (mean, std)
        self._texts: dict[str, torch.Tensor] = {}  # data.cache: caption -> features
        self.disk = DiskCache(Path(cfg.data.cache_dir), self.model) if cfg.data.cache_dir else None
        self._pool = None  # data.workers: threads that decode a batch's images
        self.step_module = TrainStep(self.model, self.method, cfg.min_snr_gamma)
        self.ddp = (
            nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.world > 1
            else self.step_module
        )
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, o))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

        # -- data: a map-style dataset of listed items, or a stream of tar shards (shards.py) --
        d = cfg.data
        streaming = is_shards(d.path)
        if streaming and d.cache:
            raise ConfigError(
                "data.cache keeps every image's latents in memory, which tar shards are for avoiding: use "
                "data.cache_dir (on disk) instead"
            )
        self.data = TrainDataset(
            [] if streaming else scan(d.path, d.caption_extension),
            d.resolution,
            cond_resolution=self.model.cfg.condition_size(d.resolution, d.resolution)[0],
            seed=cfg.seed,
            trigger=d.trigger,
            suffix=d.suffix,
            caption_dropout=d.caption_dropout,
            shuffle_caption=d.shuffle_caption,
            keep_tokens=d.keep_tokens,
            tag_dropout=d.tag_dropout,
            condition=self.method.data_condition,
            condition_dir=d.condition_dir,
            random_thresholds=cfg.method.random_thresholds,
        )
        self._bucket_batches: dict[int, list[list[int]]] = {}
        self.stream = None
        if streaming:
            self._open_stream()
        else:
            self._check_images()
            if d.buckets:
                self._assign_buckets()
        self.step = 0
        # set from another thread (the web UI's Stop): the run saves a checkpoint after this step and returns
        self.stopping = threading.Event()
        self.ema = [p.detach().clone().float() for p in self.params] if cfg.ema.decay else None
        if state is not None:
            self._restore(state)

    # -- inputs, checked before anything is trained --
    def _check_files(self, fresh: bool) -> None:
        """Every file the config names exists and reads; a fresh run does not write over another run."""
        cfg = self.cfg
        if not Path(cfg.model.ckpt).is_file():
            raise ConfigError(f"model.ckpt {cfg.model.ckpt} not found")
        for k, image in enumerate(cfg.validation.control_images):
            try:
                load_image(image)
            except ImageError as e:
                raise ConfigError(f"validation.control_images[{k}]: {e}") from None
        if cfg.data.condition_dir is not None and not Path(cfg.data.condition_dir).is_dir():
            raise ConfigError(f"data.condition_dir {cfg.data.condition_dir} is not a folder")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"output_dir {self.out} is a file")
        earlier = sorted((self.out / "checkpoints").glob("step-*.pt"))
        if fresh and earlier:
            raise ConfigError(
                f"output_dir {self.out} holds the checkpoints of an earlier run (up to {earlier[-1].name}): pass "
                "--resume latest to continue it, or choose another output_dir"
            )

    def _check_images(self) -> None:
        """Open every training image's header (and find its condition map): unreadable ones are skipped from
        the start (counted in `bad`); a dataset with none readable is an error."""
        data = self.data
        for item in data.items:
            try:
                with Image.open(item.image):
                    pass
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                log.warning("skipping unreadable image %s (%s)", item.image, e)
                data.bad.add(item.image)
        if len(data.bad) == len(data.items):
            raise ConfigError(
                f"data.path {self.cfg.data.path}: none of its {len(data.items)} image(s) can be read, e.g. "
                f"{sorted(map(str, data.bad))[:3]}"
            )
        if data.condition_dir is not None:
            missing = [i.image.name for i in data.items if not (Path(data.condition_dir) / i.image.name).is_file()]
            if missing:
                raise ConfigError(
                    f"data.condition_dir {data.condition_dir} lacks the condition map of {len(missing)} image(s), "
                    f"e.g. {missing[:3]} (each needs the same file name)"
                )

    def _buckets(self) -> list[tuple[int, int]]:
        d, multiple = self.cfg.data, self.model.cfg.image_multiple
        if d.bucket_reso_steps % multiple:
            raise ConfigError(f"data.bucket_reso_steps {d.bucket_reso_steps}: this model takes multiples of {multiple}")
        self.data.condition_size = self.model.cfg.condition_size
        return make_buckets(d.resolution, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps)

    def _assign_buckets(self) -> None:
        """Each image's aspect-ratio bucket (`buckets.py`), from its header; the dataset then makes it at that
        size. Logged: the buckets used and their image counts."""
        d = self.cfg.data
        buckets = self._buckets()
        sizes = []
        for item in self.data.items:
            size = (d.resolution, d.resolution)
            if item.image not in self.data.bad:
                size = assign(image_size(item.image), buckets, d.resolution, d.bucket_reso_steps, d.bucket_no_upscale)
            sizes.append(size)
        self.data.sizes = sizes
        counts: dict = {}
        for size in sizes:
            counts[size] = counts.get(size, 0) + 1
        log.info(
            "aspect-ratio buckets (width x height: images): %s", {f"{w}x{h}": n for (w, h), n in sorted(counts.items())}
        )

    def _open_stream(self) -> None:
        """This process's stream of tar-shard batches (its share of each global batch), with buckets if asked
        (each sample's bucket from its image header)."""
        d = self.cfg.data
        bucket_of = None
        if d.buckets:
            buckets = self._buckets()

            def bucket_of(sample: Sample) -> tuple[int, int] | None:
                try:
                    size = image_size(sample.read(sample.image_part))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    name = Path(f"{sample.shard}:{sample.key}.{sample.image_part}")
                    if name not in self.data.bad:
                        log.warning("skipping unreadable image %s (%s)", name, e)
                    self.data.bad.add(name)
                    return None
                return assign(size, buckets, d.resolution, d.bucket_reso_steps, d.bucket_no_upscale)

        share = self.cfg.optim.batch_size // self.world
        self.stream = ShardStream(
            shard_list(d.path),
            batch=share,
            seed=self.cfg.seed,
            rank=self.rank,
            world=self.world,
            buffer=d.shuffle_buffer,
            bucket_of=bucket_of,
        )
        self._stream_batches, self._stream_next = self.stream.batches(), 0

    def _stream_batch(self, micro: int) -> list[Sample]:
        """This process's samples of micro-batch `micro`: the stream replayed (references only) up to it on a
        resume, then read in order."""
        if micro < self._stream_next:
            self._stream_batches, self._stream_next = self.stream.batches(), 0
        while self._stream_next < micro:
            next(self._stream_batches)
            self._stream_next += 1
        self._stream_next += 1
        return next(self._stream_batches)

    # -- data order: a permutation per epoch (or the epoch's bucket batches); the global batch of a
    # micro-step is a slice of it --
    def _global_indices(self, micro: int) -> list[tuple[int, int]]:
        """(epoch, item index) of each sample of global micro-batch `micro`."""
        b, n = self.cfg.optim.batch_size, len(self.data)
        if self.data.sizes is not None:
            epoch, pos = divmod(micro, batches_per_epoch(self.data.sizes, b))
            return [(epoch, i) for i in self._epoch_batches(epoch)[pos]]
        out = []
        for k in range(micro * b, micro * b + b):
            epoch, pos = divmod(k, n)
            perm = torch.randperm(n, generator=_generator(self.cfg.seed, epoch))
            out.append((epoch, int(perm[pos])))
        return out

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._bucket_batches:
            self._bucket_batches = {
                epoch: epoch_batches(self.data.sizes, self.cfg.optim.batch_size, self.cfg.seed, epoch)
            }
        return self._bucket_batches[epoch]

    @torch.no_grad()
    def _prepare(self, micro: int) -> dict | None:
        """This rank's share of global batch `micro`: noisy latents, timesteps, text features, targets."""
        share = self.cfg.optim.batch_size // self.world
        if self.stream is not None:  # ident: the sample (cache key by content)
            samples = self._stream_batch(micro)
            mine = [(self.rank * share + k, sample) for k, sample in enumerate(samples)]
            items = self._load_items(samples, lambda sample: self.data.from_shard(sample, sample.size))
        else:  # ident: the item's index
            keys = self._global_indices(micro)[self.rank * share : (self.rank + 1) * share]
            mine = [(self.rank * share + k, i) for k, (_, i) in enumerate(keys)]
            items = self._load_items(keys, self.data.__getitem__)
        rows = [(slot, ident, item) for (slot, ident), item in zip(mine, items, strict=True) if item is not None]
        batch = collate([item for _, _, item in rows])
        if batch is None:
            return None
        model, dev = self.model, self.device
        img = batch["image"].to(dev)
        z = []
        for (slot, ident, _), im in zip(rows, img, strict=True):
            g = _generator(self.cfg.seed, micro, slot, 1)
            mean, std = self._posterior(ident, im)
            z.append(mean + std * torch.randn(mean.shape, generator=g).to(dev))
        z0 = model.scale_factor * torch.cat(z)
        gens = [_generator(self.cfg.seed, micro, slot, 2) for slot, _, _ in rows]
        t = torch.cat([torch.randint(0, model.num_timesteps, (1,), generator=g) for g in gens]).to(dev)
        noise = torch.cat([torch.randn((1, *z0.shape[1:]), generator=g) for g in gens])
        if self.cfg.noise_offset:
            c = z0.shape[1]
            noise += self.cfg.noise_offset * torch.cat([torch.randn((1, c, 1, 1), generator=g) for g in gens])
        noise = noise.to(dev)
        x_t = model.q_sample(z0, t, noise)
        target = noise if model.parameterization == "eps" else model.get_v(z0, noise, t)
        text = {k: batch[k] for k in ("caption", "dropped", "sizes")}
        c = None if self.trains_text else self._conditioning(text)  # text LoRA: encoded with gradients later
        out = {"x_t": x_t, "t": t, "c": c, "text": text, "target": target}
        if "cond" in batch:
            out["cond"] = batch["cond"].to(dev)
        out["weight"] = len(rows) / share  # share of this rank's slots that held a readable image
        return out

    def _load_items(self, keys: list, make) -> list[dict | None]:
        """The dataset items `make(key)` (decoded, resized, conditions made) of `keys`, with data.workers
        threads in parallel: each item depends only on its own key, so the result is the same with any number."""
        if not self.cfg.data.workers or len(keys) < 2:
            return [make(key) for key in keys]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.cfg.data.workers, thread_name_prefix="ldm-sce-data")
        return list(self._pool.map(make, keys))

    def _posterior(self, ident: int | Sample, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of q(z | image) of item `ident` (an index, or a shard sample); cached with data.cache /
        data.cache_dir (the sample is drawn fresh each time)."""
        if ident in self._posteriors:
            return self._posteriors[ident]
        key = None
        if self.disk:
            if isinstance(ident, int):
                content = self.disk.file_hash(self.data.items[ident].image)
            else:
                content = sha256(ident.read(ident.image_part))
            key = self.disk.latent_key(content, tuple(image.shape[1:]))
        found = self.disk.get(key) if key else None
        if found is not None:
            mean, std = found["mean"].to(self.device), found["std"].to(self.device)
        else:
            post = self.model.encode_first_stage(image[None])
            mean, std = post.mean, post.std
            if key:
                self.disk.put(key, {"mean": mean, "std": std})
        if self.cfg.data.cache:
            self._posteriors[ident] = (mean, std)
        return mean, std

    def _conditioning(self, batch: dict) -> Cond:
        """The batch's text conditioning. SDXL: the text features with each image's size embeddings
        (original size, crop, target), and dropped captions as sgm trains them: both text parts zero."""
        text = self._text(batch["caption"])
        if self.model.cfg.family != "sdxl":
            return text
        context, pooled = text
        keep = (~batch["dropped"]).to(context.device, context.dtype)
        context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        vector = self.model.conditioner.vector(pooled, batch["sizes"])
        return {"crossattn": context, "vector": vector}

    def _text(self, captions: list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Text features of the captions (SDXL: context and pooled); cached with data.cache."""
        encode = (  # the encoders themselves (get_learned_conditioning is no_grad: a text LoRA trains here)
            self.model.conditioner.encode_text
            if self.model.cfg.family == "sdxl"
            else self.model.cond_stage_model.encode
        )
        if not (self.cfg.data.cache or self.disk) or self.trains_text:  # a trained text LoRA: never cached
            return encode(captions)
        missing = sorted({c for c in captions if c not in self._texts})
        if self.disk and missing:  # from the disk cache where there
            for caption in missing:
                found = self.disk.get(self.disk.text_key(caption))
                if found is not None:
                    row = found["context"].to(self.device)
                    self._texts[caption] = (row, found["pooled"].to(self.device)) if "pooled" in found else row
            missing = [c for c in missing if c not in self._texts]
        if missing:
            features = encode(missing)
            rows = zip(*features, strict=True) if isinstance(features, tuple) else features
            for caption, row in zip(missing, rows, strict=True):
                self._texts[caption] = row
                if self.disk:
                    parts = {"context": row[0], "pooled": row[1]} if isinstance(row, tuple) else {"context": row}
                    self.disk.put(self.disk.text_key(caption), parts)
        rows = [self._texts[c] for c in captions]
        if not self.cfg.data.cache:  # the disk cache only: keep no features in memory
            self._texts = {}
        if isinstance(rows[0], tuple):
            return tuple(torch.stack(part) for part in zip(*rows, strict=True))
        return torch.stack(rows)

    def train(self) -> Path | None:
        """Train to optim.max_steps; returns the exported result on rank 0 (None on other ranks, or when
        `stopping` was set: then the last checkpoint holds the run)."""
        cfg, o = self.cfg, self.cfg.optim
        self.out.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=o.max_steps, initial=self.step, disable=self.rank != 0, desc=f"train {cfg.method.name}")
        while self.step < o.max_steps:
            start = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            losses = []
            for a in range(o.grad_accum):
                micro = self.step * o.grad_accum + a
                batch = self._prepare(micro)
                if batch is None and self.world > 1:  # skipping would leave the other ranks waiting
                    raise ValueError(
                        f"rank {self.rank}: every image of micro-batch {micro} is unreadable; "
                        f"remove the files listed in the warnings ({sorted(map(str, self.data.bad))[:5]})"
                    )
                if batch is None:  # every image of this micro-batch was unreadable: contribute zero gradient
                    loss = sum(p.sum() * 0.0 for p in self.params)
                else:
                    with torch.autocast(
                        self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
                    ):
                        c = batch["c"] if batch["c"] is not None else self._conditioning(batch["text"])
                        loss = (
                            self.ddp(batch["x_t"], batch["t"], c, batch["target"], batch.get("cond")) * batch["weight"]
                        )
                    losses.append(loss.item())
                    if not math.isfinite(losses[-1]):
                        raise TrainingError(self._diverged(f"the loss is {losses[-1]}"))
                self.scaler.scale(loss / o.grad_accum).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            self.step += 1
            self._update_ema()
            bar.update(1)
            loss_value = float(np.mean(losses)) if losses else None  # None: every image was unreadable
            bar.set_postfix(loss="-" if loss_value is None else f"{loss_value:.4f}")
            if self.rank == 0:
                self._log(
                    {
                        "step": self.step,
                        "loss": loss_value,
                        "lr": self.sched.get_last_lr()[0],
                        "step_time": time.perf_counter() - start,
                        "bad_images": len(self.data.bad),
                        **({"skipped_samples": self.stream.skipped} if self.stream else {}),
                        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        **(
                            {"cuda_max_mb": torch.cuda.max_memory_allocated() / 2**20}
                            if self.device.type == "cuda"
                            else {}
                        ),
                    }
                )
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < o.max_steps:
                    self._save()
                if cfg.validation.every and self.step % cfg.validation.every == 0:
                    self.sample_validation()
            if self.stopping.is_set() and self.step < o.max_steps and self.world == 1:
                bar.close()
                self._save()  # resumable with --resume latest
                self._log({"step": self.step, "stopped": True})
                return None
        bar.close()
        if not all(torch.isfinite(p).all() for p in self.params):
            raise TrainingError(self._diverged("the trained weights hold NaN or inf"))
        if self.world > 1:
            self._check_ranks_agree()
        if self.rank != 0:
            return None
        self._save()
        path = self.export()  # before the final validation images: they cannot lose the result
        if cfg.validation.prompts and not (cfg.validation.every and self.step % cfg.validation.every == 0):
            self.sample_validation()  # the final step was not validated in the loop
        return path

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema = decay * ema + (1 - decay) * w after steps past ema.start_step; before, ema = w."""
        if self.ema is None:
            return
        decay = self.cfg.ema.decay if self.step > self.cfg.ema.start_step else 0.0
        for e, p in zip(self.ema, self.params, strict=True):
            e.mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)

    def _ema_weights(self):
        """A context in which the trainable parameters hold the EMA weights (with ema.export), restored after."""
        from contextlib import contextmanager

        @contextmanager
        def swap():
            if self.ema is None or not self.cfg.ema.export:
                yield
                return
            saved = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, e in zip(self.params, self.ema, strict=True):
                    p.copy_(e)
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, w in zip(self.params, saved, strict=True):
                        p.copy_(w)

        return swap()

    def _diverged(self, what: str) -> str:
        o = self.cfg.optim
        return (
            f"step {self.step + 1}: {what}; the run stops and exports nothing (checkpoints before this step are "
            f"kept). Likely causes: a learning rate too high (optim.lr {o.lr:g}), fp16 overflow (precision "
            f"{self.cfg.precision}: try bf16 or fp32), or a base model or data that give non-finite values"
        )

    # -- outputs --
    def _log(self, row: dict) -> None:
        if row["step"] % self.cfg.log_every == 0 or row["step"] == 1 or "loss" not in row:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")  # JSON lines: NaN is not JSON

    def _check_ranks_agree(self) -> None:
        """DDP keeps the replicas equal; verify it bitwise before rank 0 writes the result."""
        # on the training device: NCCL (CUDA) takes no CPU tensors, gloo (CPU) no others
        flat = torch.cat([p.detach().flatten().float() for p in self.params])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        same = torch.tensor([int(torch.equal(flat, ref))], device=flat.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if not same.item():
            raise RuntimeError("DDP replicas diverged: trainable weights differ between ranks")
        if self.rank == 0:
            self._log({"step": self.step, "ranks_agree": True, "world_size": self.world})

    def export(self) -> Path:
        """The trained result in the method's format (a tuner file; the full model for `full`)."""
        summary = {
            "method": self.cfg.method.name,
            "steps": self.step,
            "lr": self.cfg.optim.lr,
            "batch_size": self.cfg.optim.batch_size,
            "resolution": self.cfg.data.resolution,
            "data": self.cfg.data.path,
            "trigger": self.cfg.data.trigger,
            "suffix": self.cfg.data.suffix,
            **({"zero_terminal_snr": True} if self.cfg.zero_terminal_snr else {}),
            "base_ckpt": self.cfg.model.ckpt,
        }
        if self.ema is not None:
            summary["ema"] = {"decay": self.cfg.ema.decay, "start_step": self.cfg.ema.start_step}
            summary["ema"]["exported"] = self.cfg.ema.export
        with self._ema_weights():
            return self.method.export(self.model, self.out, summary)

    @torch.no_grad()
    def sample_validation(self) -> Path:
        """A grid of the validation prompts (rows) x seeds (columns) at this step, in validation/step-N.png
        (with the EMA weights when those are exported)."""
        with self._ema_weights():
            return self._sample_validation()

    def _sample_validation(self) -> Path:
        from .images import load_image, make_grid, to_pil
        from .sampling import sample

        v, model = self.cfg.validation, self.model
        res = self.cfg.data.resolution
        images = []
        for k, prompt in enumerate(v.prompts):
            control_image = load_image(v.control_images[k % len(v.control_images)]) if v.control_images else None
            tuning = self.method.validation_tuning(control_image, model.cfg.condition_size(res, res))
            sizes = {"original_size": (res, res), "target_size": (res, res)} if model.cfg.family == "sdxl" else {}
            c = model.get_learned_conditioning([prompt] * len(v.seeds), **sizes)
            uc = model.get_unconditional_conditioning(c)
            z = sample(
                model,
                c,
                uc,
                steps=v.steps,
                scale=v.scale,
                seed=list(v.seeds),
                shape=model.cfg.latent_size(res, res),
                tuning=tuning,
                spacing="trailing" if model.zero_snr else None,  # Lin et al.: start at t = T
            )
            images += to_pil(model.decode_first_stage(z))
        path = self.out / "validation" / f"step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, n_cols=len(v.seeds)).save(path)
        return path

    # -- checkpoints: atomic, keep the last K, exact resume --
    def _save(self) -> Path:
        ckpt_dir = self.out / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "params": [p.detach().cpu() for p in self.params],
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "config": dataclasses.asdict(self.cfg),
            "ema": self.ema,
        }
        path = ckpt_dir / f"step-{self.step:06d}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in sorted(ckpt_dir.glob("step-*.pt"))[: -self.cfg.keep_last]:
            old.unlink()
        return path

    def _resolve_resume(self, resume: str) -> Path:
        if resume != "latest":
            if not Path(resume).is_file():
                raise CheckpointError(f"--resume {resume}: no such checkpoint")
            return Path(resume)
        found = sorted((self.out / "checkpoints").glob("step-*.pt"))
        if not found:
            raise CheckpointError(f"--resume latest: no checkpoints in {self.out / 'checkpoints'}")
        return found[-1]

    def _read_resume(self, path: Path, force: bool) -> dict:
        """The training state in `path`, after comparing the config it was saved with to this one."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # our own state: tensors, plain data
        except Exception as e:  # any damage: truncated zip, bad pickle, bad storage
            raise CheckpointError(
                f"{path}: the training checkpoint is truncated or corrupt ({e}); resume from an earlier one in "
                "the checkpoints folder"
            ) from None
        keys = {"step", "params", "optimizer", "scheduler", "scaler", "rng", "config"}
        if not (isinstance(state, dict) and keys <= set(state)):
            raise CheckpointError(f"{path}: not a training checkpoint of ldm-sce (it lacks {sorted(keys)})")
        breaking, harmless = config_changes(state["config"], self.cfg)
        if harmless:
            log.info("resuming %s with changed settings: %s", path, "; ".join(harmless))
        if breaking and not force:
            raise ConfigError(
                f"{path} was saved with another config, and resuming would not continue that run exactly: "
                + "; ".join(breaking)
                + ". Restore those settings, or pass --resume-force to resume with the new ones"
            )
        if breaking:
            log.warning("resuming %s with changed settings (forced): %s", path, "; ".join(breaking))
        state["path"] = path
        return state

    def _restore(self, state: dict) -> None:
        if len(state["params"]) != len(self.params) or any(
            a.shape != b.shape for a, b in zip(state["params"], self.params, strict=True)
        ):
            raise ConfigError(f"{state['path']}: checkpoint parameters do not match this config's method")
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        if self.ema is not None:
            saved = state.get("ema")
            if saved is None:  # a checkpoint of a run without EMA: it starts from the weights now
                log.warning("%s holds no EMA weights: the EMA starts from the resumed weights", state["path"])
                saved = [p.detach().float() for p in self.params]
            self.ema = [e.clone().float() for e in saved]


def lr_factor(step: int, o: OptimSection) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to 0 at `max_steps`."""
    if step < o.warmup_steps:
        return (step + 1) / (o.warmup_steps + 1)
    if o.lr_schedule == "cosine":
        progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def _rng_state() -> dict:
    """Global RNG states as tensors and plain data (loadable with weights_only=True). The trainer draws
    from seeded generators; these are kept so any global draw (e.g. by user code) resumes exactly too."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(py_state), py_gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
