"""The web UI (gradio): Generate, Train and Tuners tabs over a `Workspace`. Every action calls what the
command-line tools call (`workspace.py`: the CLI's parser and `ldm_sce.generate`, `Trainer`,
`convert_tuner`); this module only lays out the page and turns errors into messages in it.

    python tools/webui.py                     # http://127.0.0.1:7860, the embedded toy model by default
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gradio as gr

from ..conditions import CONDITIONS, make_condition
from ..images import load_image
from ..sampling import SAMPLER_NAMES
from ..skip_edits import FREEU_PRESETS
from .workspace import (
    INPUT_ERRORS,
    ControlSlot,
    DeviceQueue,
    GenerateRequest,
    Generator,
    Job,
    Training,
    TrainRequest,
    UIError,
    Workspace,
    convert_official,
    describe,
    save_upload,
)

log = logging.getLogger(__name__)
DEFAULT_MODEL = "toy-shapes.safetensors"
CONTROL_SLOTS = 2  # controllers at once in the page (multi-condition, paper eq. 7); the CLI takes any number
SLOT_INPUTS = ("controller", "control_image", "control_type", "control_weight")
GENERATE_INPUTS = (
    "ckpt prompt negative sampler steps scale seed width height batch tuner_scales lora_weights freeu freeu_v2".split()
    + [f"{name}{k}" for k in range(CONTROL_SLOTS) for name in SLOT_INPUTS]
    + "start end init_image strength".split()
)
PREVIEW_SIDE = 512


def _fail(e: Exception):
    """An input error as a message in the page (the server carries on)."""
    raise gr.Error(str(e), duration=30) from None


def _guard(fn):
    """Run a handler; the project's input errors become a message in the page."""

    def wrapped(*args):
        try:
            return fn(*args)
        except (UIError, *INPUT_ERRORS) as e:
            _fail(e)

    wrapped.__name__ = fn.__name__
    return wrapped


class App:
    def __init__(self, ws: Workspace, device: str = "cpu"):
        self.ws = ws
        self.queue = DeviceQueue()
        self.generator = Generator(ws, device)
        self.training = Training(ws)
        self.train_job: Job | None = None
        self.train_name = ""
        self._announced: Job | None = None  # the finished job whose tuner the Generate tab was given

    # -- choices --
    def checkpoints(self) -> list[str]:
        return self.ws.names("checkpoint")

    def default_checkpoint(self) -> str | None:
        names = self.checkpoints()
        return DEFAULT_MODEL if DEFAULT_MODEL in names else (names[0] if names else None)

    def datasets(self) -> list[str]:
        return sorted(p.name for p in self.ws.data.iterdir() if p.is_dir() and not p.name.startswith("."))

    def table(self) -> list[list[str]]:
        return [[r["name"], r["kind"], r["base"], r["condition"], r["summary"]] for r in self.ws.entries()]

    # -- generate --
    def condition_preview(self, image: str | None, kind: str, controller: str):
        if not image or not (kind or controller):  # nothing to extract yet
            return None
        if not kind:
            kind = describe(self.ws.inside(controller, self.ws.weights)).get("condition") or ""
        if not kind:
            raise UIError("choose a condition type (the controller does not name one)")
        img = load_image(self.ws.inside(image))
        scale = min(1.0, PREVIEW_SIDE / max(img.size))
        w, h = max(8, int(img.width * scale)), max(8, int(img.height * scale))
        return make_condition(kind, img, w, h, seed=0)

    def default_weight(self, controller: str):
        """A controller's own weight (a released controller's SCALE), shown when it is picked."""
        if not controller:
            return gr.update()
        return float(describe(self.ws.inside(controller, self.ws.weights)).get("default_weight", 1.0))

    def request(self, values: list) -> GenerateRequest:
        """The page's generate inputs (in `GENERATE_INPUTS` order) as a request; a field that is empty or not
        a number is named."""
        v = dict(zip(GENERATE_INPUTS, values, strict=True))

        def number(name: str, kind=float):
            try:
                return kind(v[name])
            except (TypeError, ValueError):
                raise UIError(f"{name.replace('_', ' ')} must be a number, got {v[name]!r}") from None

        ws = self.ws
        return GenerateRequest(
            ckpt=v["ckpt"] or "",
            prompt=v["prompt"] or "",
            negative_prompt=v["negative"] or "",
            sampler=v["sampler"],
            steps=number("steps", int),
            scale=number("scale"),
            seed=number("seed", int),
            width=number("width", int) if v["width"] else 0,
            height=number("height", int) if v["height"] else 0,
            batch=number("batch", int),
            tuners=_named_numbers(v["tuner_scales"], "the scale of tuner"),
            loras=_named_numbers(v["lora_weights"], "the weight of LoRA"),
            freeu=v["freeu"] or "",
            freeu_v2=bool(v["freeu_v2"]),
            controls=[
                ControlSlot(
                    v[f"controller{k}"],
                    str(ws.inside(v[f"control_image{k}"])) if v[f"control_image{k}"] else "",
                    v[f"control_type{k}"] or "",
                    number(f"control_weight{k}"),
                )
                for k in range(CONTROL_SLOTS)
                if v[f"controller{k}"]
            ],
            control_start=number("start"),
            control_end=number("end"),
            init_image=str(ws.inside(v["init_image"])) if v["init_image"] else "",
            strength=number("strength"),
        )

    def generate(self, *values):
        try:
            req = self.request(list(values))
            self.generator.argv(req, self.ws.outputs)  # refuse bad settings before queueing
        except (UIError, *INPUT_ERRORS) as e:
            _fail(e)
        job = self.queue.submit(Job("generate", lambda job: self.generator.run(req, job)))
        while not job.done.wait(0.3):
            if job.state == "queued":
                status = f"Queued: {self.queue.position(job)} job(s) before this one"
            else:
                status = f"Sampling: step {job.progress.get('step', 0)} of {job.progress.get('steps', req.steps)}"
            yield job.progress.get("preview"), gr.update(), status, gr.update()
        if job.state != "done":
            raise gr.Error(job.error or "stopped", duration=30)
        paths = [str(p) for p in job.result]
        yield job.progress.get("preview"), paths, f"Done: {len(paths)} image(s) in {Path(paths[0]).parent}", paths

    def picked_rows(self, names: list[str], rows):
        """The (name, scale or weight) table of the files picked, keeping the numbers already typed (default 1)."""
        keep = {str(r[0]): r[1] for r in _rows(rows)}
        return [[n, keep.get(n, 1.0)] for n in names or []]

    # -- train --
    def save_upload(self, name: str, files):
        folder, notes = save_upload(self.ws, name, [getattr(f, "name", f) for f in files or []])
        msg = f"Saved {sum(1 for p in folder.iterdir() if p.suffix != '.txt')} image(s) to data/{folder.name}"
        return gr.update(choices=self.datasets(), value=folder.name), msg + "".join(f"\n- {n}" for n in notes)

    def start(self, name, ckpt, dataset, method, condition, steps, lr, resolution, batch, prompt, every, resume):
        if self.train_job is not None and not self.train_job.done.is_set():
            raise UIError(f"run {self.train_name} is still {self.train_job.state}: stop it first")
        if not resume:
            if not ckpt or not dataset:
                raise UIError("choose a base checkpoint and a dataset")
            run = self.training.run_dir(name)
            if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
                raise UIError(f"run {name} has checkpoints already: Resume it, or choose another run name")
            req = TrainRequest(name, ckpt, dataset, method, condition, int(steps), float(lr), int(resolution))
            req.batch, req.prompt, req.validate_every = int(batch), prompt or "", int(every)
            self.training.config(req)
            from ..training import load_train_config

            load_train_config(self.training.run_dir(name) / "train.yaml")  # every setting checked now
        self.train_name = name

        def run(job: Job):
            self.generator.release()  # one model on the device: the trainer loads its own
            return self.training.run(name, job, resume=resume)

        self.train_job = self.queue.submit(Job("train", run))
        return f"Run {name}: {'resuming' if resume else 'queued'}"

    def stop(self):
        if self.train_job is None or self.train_job.done.is_set():
            return "No training is running"
        self.train_job.stop.set()
        return f"Run {self.train_name}: stopping after this step (a checkpoint is kept: Resume continues it)"

    def train_status(self):
        job, name = self.train_job, self.train_name
        if job is None:
            return "No run started", None, [], gr.update()
        status = self.training.status(name)
        losses = status["losses"]
        text = f"Run {name}: {job.state}"
        if losses:
            text += f", step {losses[-1][0]}, loss {losses[-1][1]:.4f}"
        if job.state == "queued":
            text += f" ({self.queue.position(job)} job(s) before it)"
        if job.state == "failed":
            text += f": {job.error}"
        if job.state == "done":
            text += f"; tuner saved as weights/{Path(job.result).name}"
        import pandas as pd

        plot = pd.DataFrame(losses, columns=["step", "loss"]) if losses else None
        choices = gr.update()
        if job.done.is_set() and self._announced is not job:  # once: the finished tuner in the Generate tab
            self._announced = job
            choices = gr.update(choices=self.ws.names("sc"))
        return text, plot, [str(p) for p in status["validation"]], choices

    # -- tuners --
    def convert(self, src: str, out: str, base: str, condition: str):
        message = convert_official(self.ws, src, out, base, condition)
        return self.table(), message


def _rows(value) -> list[list]:
    """Rows of a gradio Dataframe value (a pandas DataFrame, a dict with 'data', or a list), blank ones dropped."""
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):
        value = value.values.tolist()
    elif isinstance(value, dict):
        value = value.get("data", [])
    return [list(r) for r in value if r and str(r[0]).strip()]


def _named_numbers(value, what: str) -> list[tuple[str, float]]:
    """(name, number) rows of a Dataframe such as the tuners' scales; a number that is not one is named."""
    out = []
    for row in _rows(value):
        try:
            out.append((str(row[0]), float(row[1])))
        except (TypeError, ValueError, IndexError):
            raise UIError(f"{what} {row[0]} is not a number: {row[1:]!r}") from None
    return out


def _files_with_numbers(choices: list[str], label: str, what: str, number: str, table_label: str):
    """A multi-select of files and the table of a number for each one picked (elem ids: `{what}s` and
    `{what}-{number}s`)."""
    picker = gr.Dropdown(choices, value=[], multiselect=True, label=label, elem_id=f"{what}s")
    table = gr.Dataframe(
        headers=[what, number],
        datatype=["str", "number"],
        value=[],
        label=table_label,
        interactive=True,
        elem_id=f"{what}-{number}s",
    )
    return picker, table


def build(app: App) -> gr.Blocks:
    ws = app.ws
    with gr.Blocks(title="ldm-sce", analytics_enabled=False) as demo:  # nothing leaves the machine
        gr.Markdown("# ldm-sce: Stable Diffusion with SCEdit tuners and controllers")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate") as generate_tab:
                with gr.Row():
                    with gr.Column(scale=3):
                        ckpt = gr.Dropdown(app.checkpoints(), value=app.default_checkpoint(), label="Checkpoint")
                        prompt = gr.Textbox("a large red circle", label="Prompt", lines=2, elem_id="prompt")
                        negative = gr.Textbox("", label="Negative prompt", elem_id="negative")
                        with gr.Row():
                            sampler = gr.Dropdown(list(SAMPLER_NAMES), value="ddim", label="Sampler")
                            steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
                            scale = gr.Slider(0, 30, value=7.5, step=0.5, label="Guidance")
                        with gr.Row():
                            seed = gr.Number(42, precision=0, label="Seed", elem_id="seed")
                            width = gr.Number(0, precision=0, label="Width (0: the model's)", elem_id="width")
                            height = gr.Number(0, precision=0, label="Height (0: the model's)", elem_id="height")
                            batch = gr.Slider(1, 8, value=1, step=1, label="Batch")
                        with gr.Accordion("SC-Tuners", open=True):
                            tuners, tuner_scales = _files_with_numbers(
                                ws.names("sc"), "Tuners", "tuner", "scale", "Scale of each tuner"
                            )
                        with gr.Accordion("LoRA and FreeU", open=False):
                            loras, lora_weights = _files_with_numbers(
                                ws.names("lora"), "LoRA files", "lora", "weight", "Weight of each LoRA"
                            )
                            with gr.Row():
                                freeu = gr.Dropdown(
                                    ["", *FREEU_PRESETS],
                                    value="",
                                    allow_custom_value=True,
                                    label="FreeU: a preset or B1,B2,S1,S2 (empty: off)",
                                    elem_id="freeu",
                                )
                                freeu_v2 = gr.Checkbox(False, label="FreeU v2", elem_id="freeu-v2")
                        slots = []  # per controller: (controller, image, type, weight, preview)
                        with gr.Accordion("CSC-Tuner control", open=True):
                            for k in range(CONTROL_SLOTS):
                                suffix = "" if k == 0 else f"-{k + 1}"
                                box = (
                                    gr.Group()
                                    if k == 0
                                    else gr.Accordion(f"Controller {k + 1} (multi-condition)", open=False)
                                )
                                with box:
                                    with gr.Row():
                                        controller = gr.Dropdown(
                                            [""] + ws.names("csc"),
                                            value="",
                                            label=f"Controller {k + 1}" if k else "Controller",
                                            elem_id=f"controller{suffix}",
                                        )
                                        control_type = gr.Dropdown(
                                            ["", *CONDITIONS], value="", label="Condition (empty: the controller's)"
                                        )
                                    with gr.Row():
                                        control_image = gr.Image(
                                            type="filepath",
                                            label="Control image",
                                            sources=["upload"],
                                            height=224,
                                            elem_id=f"control-image{suffix}",
                                        )
                                        preview = gr.Image(
                                            label="Extracted condition",
                                            interactive=False,
                                            height=224,
                                            elem_id=f"preview{suffix}",
                                        )
                                    control_weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight")
                                slots.append((controller, control_image, control_type, control_weight, preview))
                            with gr.Row():
                                start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start (all controllers)")
                                end = gr.Slider(0, 1, value=1.0, step=0.05, label="End (all controllers)")
                        with gr.Accordion("Image to image", open=False) as img2img_box:
                            init_image = gr.Image(
                                type="filepath", label="Init image (empty: text to image)", elem_id="init-image"
                            )
                            strength = gr.Slider(0.05, 1, value=0.75, step=0.05, label="Denoising strength")
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column(scale=2):
                        status = gr.Markdown("", elem_id="gen-status")
                        live = gr.Image(label="Progress", interactive=False, elem_id="live")
                        gallery = gr.Gallery(label="Images", columns=2, elem_id="gallery", interactive=False)
                        shown, selected = gr.State([]), gr.State("")
                        with gr.Row():
                            to_img2img = gr.Button("Send to img2img", elem_id="to-img2img")
                            to_control = gr.Button("Use as control image", elem_id="to-control")
                        refresh = gr.Button("Refresh files", elem_id="refresh", size="sm")

            with gr.Tab("Train", id="train") as train_tab:
                with gr.Row():
                    with gr.Column():
                        run_name = gr.Textbox("my-tuner", label="Run name", elem_id="run-name")
                        train_ckpt = gr.Dropdown(app.checkpoints(), value=app.default_checkpoint(), label="Base")
                        dataset = gr.Dropdown(app.datasets(), label="Dataset (a folder under data/)", elem_id="dataset")
                        with gr.Accordion("Upload images with captions", open=False):
                            upload = gr.File(
                                file_count="multiple", label="Images and same-name .txt captions", elem_id="upload"
                            )
                            upload_name = gr.Textbox("upload", label="Dataset name", elem_id="upload-name")
                            save = gr.Button("Save as dataset", elem_id="save-upload")
                            upload_msg = gr.Markdown("", elem_id="upload-msg")
                        with gr.Row():
                            method = gr.Radio(["sc", "csc"], value="sc", label="Method", elem_id="method")
                            condition = gr.Dropdown(
                                ["canny", "color", "inpaint"], value="canny", label="Condition (csc)"
                            )
                        with gr.Row():
                            train_steps = gr.Number(100, precision=0, label="Steps", elem_id="train-steps")
                            lr = gr.Number(1e-4, label="Learning rate", elem_id="lr")
                            resolution = gr.Number(512, precision=0, label="Resolution", elem_id="resolution")
                            train_batch = gr.Number(1, precision=0, label="Batch size", elem_id="train-batch")
                        val_prompt = gr.Textbox("", label="Validation prompt", elem_id="val-prompt")
                        val_every = gr.Number(0, precision=0, label="Validate every N steps (0: at the end)")
                        with gr.Row():
                            start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                            stop_btn = gr.Button("Stop", elem_id="train-stop")
                            resume_btn = gr.Button("Resume", elem_id="train-resume")
                    with gr.Column():
                        train_status = gr.Markdown("No run started", elem_id="train-status")
                        loss_plot = gr.LinePlot(x="step", y="loss", label="Loss", elem_id="loss-plot")
                        validation = gr.Gallery(label="Validation", columns=1, elem_id="validation")
                timer = gr.Timer(1.0)

            with gr.Tab("Tuners", id="tuners") as tuners_tab:
                files = gr.Dataframe(
                    app.table(),
                    headers=["file", "kind", "base", "condition", "training"],
                    label="weights/",
                    elem_id="weights-table",
                )
                with gr.Accordion("Convert an official SCEdit folder", open=True):
                    with gr.Row():
                        src = gr.Textbox("", label="Folder or file (under weights/ or data/)")
                        out = gr.Textbox("", label="Output name (in weights/)")
                        base = gr.Dropdown(["", "sd1", "sd2", "sdxl"], value="", label="Base")
                        cond = gr.Dropdown(["", *CONDITIONS], value="", label="Condition (controllers)")
                    convert = gr.Button("Convert")
                    convert_msg = gr.Markdown("")

        # -- events --
        inputs = [ckpt, prompt, negative, sampler, steps, scale, seed, width, height, batch, tuner_scales]
        inputs += [lora_weights, freeu, freeu_v2]
        inputs += [part for slot in slots for part in slot[:4]] + [start, end, init_image, strength]
        assert len(inputs) == len(GENERATE_INPUTS)  # the same order: `App.request` reads them by these names
        run.click(app.generate, inputs, [live, gallery, status, shown], concurrency_limit=4)
        tuners.change(_guard(app.picked_rows), [tuners, tuner_scales], tuner_scales)
        loras.change(_guard(app.picked_rows), [loras, lora_weights], lora_weights)
        for controller, control_image, control_type, control_weight, preview in slots:
            for trigger in (control_image.change, control_type.change, controller.change):
                trigger(_guard(app.condition_preview), [control_image, control_type, controller], preview)
            controller.change(_guard(app.default_weight), controller, control_weight)

        def on_select(paths: list[str], evt: gr.SelectData):
            return paths[evt.index] if isinstance(evt.index, int) and evt.index < len(paths) else ""

        def send(path: str, paths: list[str]):
            path = path or (paths[0] if paths else "")  # nothing selected: the first image
            if not path:
                raise gr.Error("generate an image first", duration=10)
            return path

        gallery.select(on_select, shown, selected)
        to_img2img.click(
            lambda p, ps: (send(p, ps), gr.update(open=True)), [selected, shown], [init_image, img2img_box]
        )
        to_control.click(send, [selected, shown], slots[0][1])

        def refresh_files():
            sc, csc, models, lora = ws.names("sc"), [""] + ws.names("csc"), app.checkpoints(), ws.names("lora")
            pickers = (sc, models, lora, *[csc for _ in slots])
            return tuple(gr.update(choices=choices) for choices in pickers)

        pickers = [tuners, ckpt, loras, *[slot[0] for slot in slots]]
        refresh.click(refresh_files, None, pickers)
        generate_tab.select(refresh_files, None, pickers)
        train_tab.select(
            lambda: (gr.update(choices=app.datasets()), gr.update(choices=app.checkpoints())),
            None,
            [dataset, train_ckpt],
        )
        tuners_tab.select(app.table, None, files)

        save.click(_guard(app.save_upload), [upload_name, upload], [dataset, upload_msg])
        train_inputs = [run_name, train_ckpt, dataset, method, condition, train_steps, lr, resolution, train_batch]
        train_inputs += [val_prompt, val_every]
        start_btn.click(_guard(lambda *v: app.start(*v, False)), train_inputs, train_status)
        resume_btn.click(_guard(lambda *v: app.start(*v, True)), train_inputs, train_status)
        stop_btn.click(app.stop, None, train_status)
        timer.tick(app.train_status, None, [train_status, loss_plot, validation, tuners])
        convert.click(_guard(app.convert), [src, out, base, cond], [files, convert_msg])
    return demo


def launch(
    root: str | Path = ".",
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    weights: str = "weights",
    outputs: str = "outputs",
    data: str = "data",
    block: bool = True,
):
    """Serve the UI on host:port (127.0.0.1: this machine only) over weights/, outputs/ and data/ under root."""
    root = Path(root)
    ws = Workspace(root / weights, root / outputs, root / data)
    os.environ["GRADIO_TEMP_DIR"] = str(ws.outputs / ".uploads")  # uploads stay under outputs/
    demo = build(App(ws, device))
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(ws.outputs), str(ws.data)],
        max_file_size="200mb",
        show_error=True,
        ssr_mode=False,
        theme=theme,
        prevent_thread_lock=not block,
        quiet=False,
    )
    return demo
