"""What the web UI works on, without the UI: the folders it may read and write, the files in `weights/`,
one queue of device jobs, and the generation and training jobs themselves. Generation goes through
`ldm_sce.generate` (the CLI's txt2img / img2img, with the CLI's argument parser and checks) and training
through `Trainer` with a config checked by `load_train_config`, exactly as `tools/train.py` runs it."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..checkpoint_io import CheckpointError, file_kind
from ..config import ConfigError
from ..images import IMAGE_EXTS, ImageError, NonFiniteError

log = logging.getLogger(__name__)
MODEL_SUFFIXES = (".safetensors", ".ckpt")
# errors that are the user's input: shown in the page as they are
INPUT_ERRORS = (ConfigError, CheckpointError, ImageError, NonFiniteError, ValueError, FileExistsError)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class UIError(Exception):
    """An input or setting the UI refuses, with the message shown in the page."""


def check_name(name: str, what: str) -> str:
    name = (name or "").strip()
    if not _NAME.match(name) or ".." in name:
        raise UIError(f"{what} {name!r}: use 1-64 letters, digits, '_', '-' or '.' (no folders)")
    return name


class Workspace:
    """The folders the UI may use: `weights/` (models and tuners, read; finished tuners written), `outputs/`
    (generations and training runs) and `data/` (datasets, uploads). Every path from the page is resolved
    and must lie inside one of them."""

    def __init__(self, weights: str | Path, outputs: str | Path, data: str | Path):
        self.weights, self.outputs, self.data = (Path(p).resolve() for p in (weights, outputs, data))
        for folder in (self.weights, self.outputs, self.data):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def folders(self) -> tuple[Path, Path, Path]:
        return self.weights, self.outputs, self.data

    def inside(self, path: str | Path, *folders: Path) -> Path:
        """`path` resolved (relative: to the first of `folders` that holds it, else the first), if it lies
        inside one of `folders` (default all)."""
        folders = folders or self.folders
        p = Path(path)
        if not p.is_absolute():
            p = next((f / p for f in folders if (f / p).exists()), folders[0] / p)
        p = p.resolve()
        if not any(p == f or f in p.parents for f in folders):
            raise UIError(f"{path} is outside the folders this UI may use ({', '.join(map(str, folders))})")
        return p

    # -- weights/ --
    def entries(self) -> list[dict]:
        """Every model, tuner, controller and LoRA file in weights/ (and official tuner folders), with what its
        header says: kind, base, condition, training summary. Read from the safetensors header only."""
        rows = []
        for path in sorted(self.weights.iterdir()):
            if path.is_dir() or path.suffix in MODEL_SUFFIXES:
                rows.append(describe(path))
        return rows

    def names(self, *kinds: str) -> list[str]:
        return [row["name"] for row in self.entries() if row["kind"] in kinds]


def describe(path: Path) -> dict:
    """One weights/ entry: {'name', 'kind' (checkpoint, sc, csc, lora, official, unknown), 'base', 'condition',
    'summary'}; an unreadable file is 'unknown' with the reason as its summary."""
    row = {"name": path.name, "kind": "unknown", "base": "", "condition": "", "summary": ""}
    if path.is_dir():
        row.update(kind="official", summary="a folder: an official SCEdit tuner to convert (Tuners tab)")
        return row
    if path.suffix == ".ckpt":
        row.update(kind="checkpoint", summary="a pickled checkpoint (read when it is loaded)")
        return row
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
    except Exception as e:  # a damaged or foreign file: listed, not fatal
        row["summary"] = f"unreadable: {e}"
        return row
    row["kind"] = file_kind(dict.fromkeys(keys), meta)
    if "ldm_sce.tuner" in meta:
        try:
            tuner = json.loads(meta["ldm_sce.tuner"])
        except json.JSONDecodeError:
            tuner = {}
        row["base"] = tuner.get("base") or ""
        row["condition"] = tuner.get("condition") or ""
        row["default_weight"] = tuner.get("default_weight", 1.0)
        training = tuner.get("training") or {}
        parts = [f"{k} {training[k]}" for k in ("method", "steps", "lr", "batch_size", "resolution") if k in training]
        if "converted_from" in training:
            parts.append(f"converted from {Path(str(training['converted_from'])).name}")
        row["summary"] = ", ".join(parts)
    elif row["kind"] == "checkpoint" and "ldm_sce.config" in meta:
        row["summary"] = "with its config embedded"
    return row


# ---------------------------------------------------------------------------------------------------------
# The device queue: one job at a time, in order
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    kind: str  # 'generate' | 'train'
    run: Callable[[Job], object]
    state: str = "queued"  # queued, running, done, failed, stopped
    progress: dict = field(default_factory=dict)
    result: object = None
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


class DeviceQueue:
    """Jobs run one after another on one worker thread (one model on the device at a time); `position(job)`
    is how many wait before it. A job's failure is recorded on the job (its message for the page); the
    worker goes on with the next."""

    def __init__(self):
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []
        self._lock = threading.Lock()
        self.current: Job | None = None
        threading.Thread(target=self._work, name="ldm-sce-device", daemon=True).start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._waiting.append(job)
        self._queue.put(job)
        return job

    def position(self, job: Job) -> int:
        with self._lock:
            return self._waiting.index(job) + (self.current is not None) if job in self._waiting else 0

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self._waiting.remove(job)
                self.current = job
            if job.stop.is_set():
                job.state = "stopped"
            else:
                job.state = "running"
                try:
                    job.result = job.run(job)
                    job.state = "stopped" if job.stop.is_set() and job.result is None else "done"
                except INPUT_ERRORS + (UIError,) as e:
                    job.state, job.error = "failed", str(e)
                except SystemExit as e:  # argparse refusing an argument
                    job.state, job.error = "failed", f"bad setting ({e})"
                except Exception as e:  # a bug: logged with its traceback, reported, the worker lives on
                    log.exception("%s job failed", job.kind)
                    job.state, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
            with self._lock:
                self.current = None
            job.done.set()


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ControlSlot:
    controller: str  # a file in weights/
    image: str  # a file path (an upload, or an image under outputs/)
    kind: str = ""  # the condition type; empty: the controller's own
    weight: float | None = None  # None: the controller's default weight


@dataclass
class GenerateRequest:
    ckpt: str
    prompt: str
    negative_prompt: str = ""
    sampler: str = "ddim"
    steps: int = 20
    scale: float = 7.5
    seed: int = 42
    width: int = 0  # 0: the model's own size
    height: int = 0
    batch: int = 1
    tuners: list[tuple[str, float]] = field(default_factory=list)
    loras: list[tuple[str, float]] = field(default_factory=list)  # LoRA files in weights/, with their weights
    freeu: str = ""  # FreeU: a preset (sd1, sd2, sdxl) or "B1,B2,S1,S2"; '' : off
    freeu_v2: bool = False
    controls: list[ControlSlot] = field(default_factory=list)  # CSC-Tuner controllers (multi-condition: several)
    control_start: float = 0.0
    control_end: float = 1.0
    init_image: str = ""  # img2img when given
    strength: float = 0.75


class Generator:
    """Generation jobs: the CLI's argument list built from a request, parsed by the CLI's own parser, run
    by `ldm_sce.generate` on a base model kept loaded between runs (reset before each)."""

    def __init__(self, ws: Workspace, device: str = "cpu"):
        self.ws, self.device = ws, device
        self._model = None
        self._model_key = None

    def argv(self, r: GenerateRequest, outdir: Path) -> list[str]:
        ws = self.ws
        ckpt = ws.inside(r.ckpt, ws.weights)
        if not ckpt.is_file():
            raise UIError(f"checkpoint {r.ckpt} not found in {ws.weights}")
        if not (r.prompt or "").strip():
            raise UIError("the prompt is empty")
        argv = ["--ckpt", str(ckpt), "--prompt", r.prompt, "--negative-prompt", r.negative_prompt or ""]
        argv += ["--sampler", r.sampler, "--ddim_steps", str(int(r.steps)), "--scale", str(float(r.scale))]
        argv += ["--seed", str(int(r.seed)), "--n_samples", str(int(r.batch)), "--device", self.device]
        argv += ["--outdir", str(outdir), "--skip_grid", "--quiet"]
        if r.width and r.height and not r.init_image:
            argv += ["--W", str(int(r.width)), "--H", str(int(r.height))]
        for name, scale in r.tuners:
            argv += ["--tuner", str(ws.inside(name, ws.weights)), "--tuner-scale", str(float(scale))]
        for name, weight in r.loras:
            argv += ["--lora", f"{ws.inside(name, ws.weights)}:{float(weight)}"]
        if (r.freeu or "").strip():
            argv += ["--freeu", r.freeu.strip(), *(["--freeu-v2"] if r.freeu_v2 else [])]
        for k, c in enumerate(r.controls, 1):
            if not c.image:
                raise UIError(f"controller {k} needs a control image: upload one (or use a generated image)")
            path = ws.inside(c.controller, ws.weights)
            kind = c.kind or describe(path)["condition"]  # the CLI takes a type for every controller or none
            if not kind:
                raise UIError(f"controller {k} ({c.controller}) does not name its condition: choose one")
            argv += ["--control", str(path), "--control-image", c.image, "--control-type", kind]
            if c.weight is not None:
                argv += ["--control-weight", str(float(c.weight))]
        if r.controls:
            if len({c.weight is None for c in r.controls}) > 1:
                raise UIError("give every controller a weight, or none")
            argv += ["--control-start", str(float(r.control_start)), "--control-end", str(float(r.control_end))]
        if r.init_image:
            argv += ["--init-img", r.init_image, "--strength", str(float(r.strength))]
        return argv

    def release(self) -> None:
        """Drop the kept model (before a training job loads its own)."""
        self._model = self._model_key = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, r: GenerateRequest, job: Job | None = None, preview_every: int = 5) -> list[Path]:
        from ..cli import load
        from ..generate import img2img, img2img_parser, reset_model, txt2img, txt2img_parser
        from ..images import to_pil

        outdir = self.ws.outputs / ("img2img" if r.init_image else "txt2img")
        parser = img2img_parser() if r.init_image else txt2img_parser()
        args = parser.parse_args(self.argv(r, outdir))
        key = (args.ckpt, os.stat(args.ckpt).st_mtime_ns, self.device)
        if self._model_key != key:
            self._model, self._model_key = None, None
            self._model = load(args)
            self._model_key = key
        model = reset_model(self._model)

        def callback(step) -> None:
            if job is None:
                return
            job.progress = {**job.progress, "step": step.i + 1, "steps": step.n}
            if (step.i + 1) % preview_every == 0 or step.i + 1 == step.n:
                job.progress["preview"] = to_pil(model.decode_first_stage(step.denoised[:1].float()))[0]

        try:
            return (img2img if r.init_image else txt2img)(args, model, callback)
        finally:
            reset_model(model)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainRequest:
    name: str
    ckpt: str
    dataset: str  # a folder under data/
    method: str = "sc"  # sc | csc
    condition: str = "canny"  # csc
    steps: int = 100
    lr: float = 1e-4
    resolution: int = 512
    batch: int = 1
    prompt: str = ""  # validation prompt ('' : none)
    validate_every: int = 0


class Training:
    """Training runs under outputs/train/<name>/ (config, checkpoints, log, validation grids): started,
    stopped after the current step (a checkpoint is kept) and resumed exactly, as `tools/train.py
    --resume latest` does. The finished tuner is copied to weights/<name>.safetensors."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.trainer = None

    def run_dir(self, name: str) -> Path:
        return self.ws.outputs / "train" / check_name(name, "run name")

    def config(self, r: TrainRequest) -> Path:
        """The run's YAML (checked by `load_train_config` when the job starts)."""
        ws = self.ws
        if r.method not in ("sc", "csc"):
            raise UIError(f"method {r.method!r}: sc or csc")
        ckpt = ws.inside(r.ckpt, ws.weights)
        data = ws.inside(r.dataset, ws.data)
        if not data.is_dir():
            raise UIError(f"dataset {r.dataset} is not a folder under {ws.data}")
        method = {"name": r.method} | ({"condition": r.condition} if r.method == "csc" else {})
        cfg = {
            "model": {"ckpt": str(ckpt)},
            "method": method,
            "data": {"path": str(data), "resolution": int(r.resolution)},
            "optim": {"lr": float(r.lr), "batch_size": int(r.batch), "max_steps": int(r.steps)},
            "validation": {"prompts": [r.prompt] if r.prompt.strip() else [], "every": int(r.validate_every)},
            "output_dir": str(self.run_dir(r.name)),
            "save_every": max(1, int(r.steps) // 4),
            "log_every": 1,
        }
        if r.method == "csc" and r.prompt.strip():
            images = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            if images:  # the validation control image: the dataset's first image
                cfg["validation"]["control_images"] = [str(images[0])]
        path = self.run_dir(r.name) / "train.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(cfg))
        os.replace(tmp, path)
        return path

    def run(self, name: str, job: Job, resume: bool = False) -> Path | None:
        from ..training import Trainer, load_train_config

        path = self.run_dir(name) / "train.yaml"
        if not path.is_file():
            raise UIError(f"no run named {name} (start one first)")
        cfg = load_train_config(path)
        checkpoints = sorted((self.run_dir(name) / "checkpoints").glob("step-*.pt"))
        if resume and not checkpoints:
            raise UIError(f"run {name} has no checkpoint to resume from")
        self.trainer = Trainer(cfg, resume="latest" if resume else None)
        self.trainer.stopping = job.stop  # Stop sets it; the trainer reads it after each step
        if job.stop.is_set():
            return None
        result = self.trainer.train()
        if result is None:
            return None
        target = self.ws.weights / f"{name}.safetensors"
        if target.exists():
            target = self.ws.weights / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(result, tmp)
        os.replace(tmp, target)
        return target

    def status(self, name: str) -> dict:
        """The run's log rows (loss per step), its validation grids and whether it has checkpoints."""
        run = self.run_dir(name)
        rows = []
        log_path = run / "log.jsonl"
        if log_path.is_file():
            for line in log_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written
                    pass
        return {
            "losses": [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None],
            "validation": sorted((run / "validation").glob("step-*.png")),
            "checkpoints": sorted((run / "checkpoints").glob("step-*.pt")),
            "stopped": any(r.get("stopped") for r in rows),
        }

    def runs(self) -> list[str]:
        root = self.ws.outputs / "train"
        return sorted(p.name for p in root.iterdir() if (p / "train.yaml").is_file()) if root.is_dir() else []


def save_upload(ws: Workspace, name: str, files: list[str]) -> tuple[Path, list[str]]:
    """Uploaded images and same-name .txt captions copied into data/<name>/ (a new folder); every image is
    decoded first: unreadable ones are left out and named in the returned notes."""
    from ..images import load_image

    name = check_name(name, "dataset name")
    folder = ws.data / name
    if folder.exists():
        raise UIError(f"data/{name} exists already: choose another dataset name")
    notes, keep = [], []
    for f in files or []:
        src = Path(f)
        suffix = src.suffix.lower()
        if suffix == ".txt":
            keep.append(src)
        elif suffix in IMAGE_EXTS:
            try:
                load_image(src)
                keep.append(src)
            except ImageError as e:
                notes.append(f"left out {src.name}: {str(e).replace(str(src), src.name)}")
        else:
            notes.append(f"left out {src.name}: not an image or a .txt caption")
    if not any(p.suffix.lower() != ".txt" for p in keep):
        raise UIError("no readable images in the upload" + (f" ({'; '.join(notes)})" if notes else ""))
    tmp = ws.data / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for src in keep:
        shutil.copyfile(src, tmp / _safe_filename(src.name))
    os.replace(tmp, folder)
    return folder, notes


def _safe_filename(name: str) -> str:
    """A file name of letters, digits, '_', '-' and '.' only (others become '_'), never hidden."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).name).lstrip(".")
    return name or "file"


def convert_official(ws: Workspace, src: str, out: str, base: str = "", condition: str = "") -> str:
    """An official SCEdit folder or file under weights/ or data/ converted to weights/<out>.safetensors
    (`convert_tuner`, as `tools/convert_tuner.py`); returns what was written."""
    from ..tuner_files import convert_tuner

    source = ws.inside(src, ws.weights, ws.data)
    name = check_name(out, "output name")
    target = ws.weights / (name if name.endswith(".safetensors") else name + ".safetensors")
    tf = convert_tuner(source, target, base or None, condition or None)
    return f"Wrote weights/{target.name}: {tf.kind} tuner, {len(tf.skips)} skips, base {tf.base}"
