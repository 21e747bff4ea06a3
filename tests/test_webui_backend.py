"""What the web UI does without a browser (`ldm_sce/ui/workspace.py`): paths kept inside the configured
folders, the one-job device queue (order, positions, a failing job does not stop it), uploads with bad
files, weights/ listed from the headers, an official folder converted, and training started, stopped after
a step and resumed to the same tuner as a straight run, bitwise; generation requests (tuners, controllers,
LoRA files, FreeU) are the CLI's flags and give the CLI's images, bitwise."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_sce.tuner_files import read_tuner_file
from ldm_sce.ui.workspace import (
    DeviceQueue,
    Job,
    Training,
    TrainRequest,
    UIError,
    Workspace,
    convert_official,
    describe,
    save_upload,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ws(tmp_path):
    ws = Workspace(tmp_path / "weights", tmp_path / "outputs", tmp_path / "data")
    for name in ("toy-shapes.safetensors", "toy-style-sc.safetensors", "toy-canny-csc.safetensors"):
        shutil.copyfile(ROOT / "weights" / name, ws.weights / name)
    return ws


def test_paths_stay_inside_the_folders(ws, tmp_path):
    assert ws.inside("toy-shapes.safetensors", ws.weights) == ws.weights / "toy-shapes.safetensors"
    assert ws.inside(ws.data / "a" / "b.png") == ws.data / "a" / "b.png"
    for bad in ("../outputs/x", "/etc/passwd", str(tmp_path / "elsewhere.png"), "a/../../x"):
        with pytest.raises(UIError, match="outside the folders"):
            ws.inside(bad, ws.weights)
    with pytest.raises(UIError, match="outside"):
        ws.inside(ws.outputs / "x.png", ws.weights, ws.data)


def test_weights_are_listed_from_their_headers(ws):
    (ws.weights / "broken.safetensors").write_bytes(b"\x00garbage")
    (ws.weights / "official_folder").mkdir()
    rows = {r["name"]: r for r in ws.entries()}
    assert rows["toy-shapes.safetensors"]["kind"] == "checkpoint"
    assert rows["toy-style-sc.safetensors"]["kind"] == "sc" and rows["toy-style-sc.safetensors"]["base"]
    assert rows["toy-canny-csc.safetensors"]["kind"] == "csc"
    assert rows["toy-canny-csc.safetensors"]["condition"] == "canny"
    assert "steps" in rows["toy-style-sc.safetensors"]["summary"]
    assert rows["broken.safetensors"]["kind"] == "unknown" and "unreadable" in rows["broken.safetensors"]["summary"]
    assert rows["official_folder"]["kind"] == "official"
    assert ws.names("sc") == ["toy-style-sc.safetensors"]


def test_the_device_queue_runs_one_job_at_a_time_in_order():
    q = DeviceQueue()
    gate, order = threading.Event(), []

    def first(job):
        order.append("first")
        gate.wait(10)
        raise ValueError("a bad setting")

    a = q.submit(Job("generate", first))
    b = q.submit(Job("generate", lambda job: order.append("second") or "ok"))
    c = q.submit(Job("generate", lambda job: 1 / 0))
    while a.state != "running":
        pass
    assert q.position(b) == 1 and q.position(c) == 2 and b.state == "queued"
    gate.set()
    for job in (a, b, c):
        assert job.done.wait(10)
    assert order == ["first", "second"]
    assert (a.state, a.error) == ("failed", "a bad setting")  # an input error: its message
    assert b.state == "done" and b.result == "ok"
    assert c.state == "failed" and c.error.startswith("internal error: ZeroDivisionError")  # a bug: reported
    d = q.submit(Job("generate", lambda job: 2))
    assert d.done.wait(10) and d.result == 2  # the worker lives on


def test_uploads_keep_readable_images_and_captions(ws, tmp_path):
    up = tmp_path / "up"
    up.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(up / "a.png")
    (up / "a.txt").write_text("a black square")
    (up / "b.png").write_bytes(b"not a png")
    (up / "c.exe").write_bytes(b"MZ")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(up / "my photo (1).png")
    folder, notes = save_upload(ws, "mine", [str(p) for p in sorted(up.iterdir())])
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt", "my_photo__1_.png"]
    assert any("b.png" in n for n in notes) and any("c.exe" in n for n in notes)
    with pytest.raises(UIError, match="exists already"):
        save_upload(ws, "mine", [str(up / "a.png")])
    with pytest.raises(UIError, match="no readable images"):
        save_upload(ws, "other", [str(up / "b.png")])
    with pytest.raises(UIError, match="dataset name"):
        save_upload(ws, "../escape", [str(up / "a.png")])


def test_an_official_folder_is_converted_into_weights(ws):
    tf = read_tuner_file(ws.weights / "toy-style-sc.safetensors")
    swift = ws.data / "official" / "0_SwiftSCETuning"
    swift.mkdir(parents=True)
    config = {"dims": tf.skip_dims, "down_ratio": tf.down_ratio, "tuner_mode": "identity", "tuner_op": "SCEAdapter"}
    (swift / "adapter_config.json").write_text(json.dumps(config))
    official = {
        f"model.lsc_identity.{k.split('.', 2)[1]}.scetuner_0_SwiftSCETuning.tuner_op.{k.split('.', 2)[2]}": v
        for k, v in tf.state_dict.items()
    }
    save_file(official, str(swift / "adapter_model.safetensors"))
    message = convert_official(ws, "official", "converted", "sd1", "")
    assert "Wrote weights/converted.safetensors: sc tuner" in message
    assert {"name": "converted.safetensors", "kind": "sc"}.items() <= describe(
        ws.weights / "converted.safetensors"
    ).items()
    ours, theirs = load_file(ws.weights / "toy-style-sc.safetensors"), load_file(ws.weights / "converted.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert describe(ws.weights / "converted.safetensors")["summary"].endswith("converted from official")
    with pytest.raises(UIError, match="outside"):
        convert_official(ws, "../../etc", "x")
    with pytest.raises(FileExistsError):
        convert_official(ws, "official", "converted")  # never over a file


def _toy_data(ws):
    folder = ws.data / "circles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        arr = np.full((64, 64, 3), 235, np.uint8)
        x, y = rng.integers(8, 40, 2)
        arr[y : y + 20, x : x + 20] = (220, 30, 30)
        Image.fromarray(arr).save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text("a red square zqx style")


def test_training_stops_after_a_step_and_resumes_to_the_straight_run(ws, monkeypatch):
    from ldm_sce.training import Trainer, load_train_config

    _toy_data(ws)
    training, q = Training(ws), DeviceQueue()
    for name in ("straight", "stopped"):
        req = TrainRequest(name, "toy-shapes.safetensors", "circles", steps=4, lr=1e-3, resolution=64, batch=2)
        training.config(req)
    csc = TrainRequest("ctrl", "toy-shapes.safetensors", "circles", "csc", "canny", resolution=64, prompt="a circle")
    cfg = load_train_config(training.config(csc))  # the checks tools/train.py makes
    assert cfg.method.condition == "canny" and cfg.validation.control_images == [str(ws.data / "circles" / "0.png")]
    with pytest.raises(UIError, match="not a folder under"):
        training.config(TrainRequest("x", "toy-shapes.safetensors", "nothing-here"))
    straight = q.submit(Job("train", lambda job: training.run("straight", job)))
    assert straight.done.wait(300) and straight.state == "done", straight.error
    assert straight.result == ws.weights / "straight.safetensors"

    log = Trainer._log

    def stop_at_2(self, row):  # what the Stop button does, after step 2
        log(self, row)
        if row.get("step") == 2 and "loss" in row:
            training_job.stop.set()

    monkeypatch.setattr(Trainer, "_log", stop_at_2)
    training_job = q.submit(Job("train", lambda job: training.run("stopped", job)))
    assert training_job.done.wait(300) and training_job.state == "stopped", training_job.error
    status = training.status("stopped")
    assert status["stopped"] and [s for s, _ in status["losses"]] == [1, 2] and len(status["checkpoints"]) >= 1
    assert not (ws.weights / "stopped.safetensors").exists()
    monkeypatch.setattr(Trainer, "_log", log)
    resumed = q.submit(Job("train", lambda job: training.run("stopped", job, resume=True)))
    assert resumed.done.wait(300) and resumed.state == "done", resumed.error
    a, b = load_file(ws.weights / "straight.safetensors"), load_file(ws.weights / "stopped.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert training.runs() == ["ctrl", "stopped", "straight"]
    with pytest.raises(UIError, match="run name"):
        training.run_dir("../x")


def test_generation_is_the_clis_with_two_controllers_and_a_tuner(ws, tmp_path):
    """A request with a tuner and two controllers (multi-condition) becomes the CLI's flags and gives the
    CLI's image, bitwise; the kept model is reset in between (a plain request after it is the plain CLI)."""
    from ldm_sce.generate import txt2img, txt2img_parser
    from ldm_sce.ui.workspace import ControlSlot, GenerateRequest, Generator

    control = ws.outputs / "control.png"
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((0, 0, 0), (10, 30, 50, 50))
    img.save(control)
    gen = Generator(ws)
    slots = [ControlSlot("toy-canny-csc.safetensors", str(control), "", 0.7)]
    slots.append(ControlSlot("toy-canny-csc.safetensors", str(control), "color", 0.4))
    req = GenerateRequest("toy-shapes.safetensors", "a red circle", steps=4, tuners=[("toy-style-sc.safetensors", 0.5)])
    req.controls, req.control_end = slots, 0.6
    argv = gen.argv(req, tmp_path)
    csc = str(ws.weights / "toy-canny-csc.safetensors")
    assert argv[argv.index("--tuner") : argv.index("--tuner") + 4] == [
        "--tuner",
        str(ws.weights / "toy-style-sc.safetensors"),
        "--tuner-scale",
        "0.5",
    ]
    flags = argv[argv.index("--control") :]
    assert flags == [
        *("--control", csc, "--control-image", str(control), "--control-type", "canny", "--control-weight", "0.7"),
        *("--control", csc, "--control-image", str(control), "--control-type", "color", "--control-weight", "0.4"),
        *("--control-start", "0.0", "--control-end", "0.6"),
    ]
    made = gen.run(req)
    argv[argv.index("--outdir") + 1] = str(tmp_path / "cli")
    cli = txt2img(txt2img_parser().parse_args(argv))
    assert np.array_equal(np.asarray(Image.open(made[0])), np.asarray(Image.open(cli[0])))
    plain = gen.run(GenerateRequest("toy-shapes.safetensors", "a red circle", steps=4))
    base_argv = gen.argv(GenerateRequest("toy-shapes.safetensors", "a red circle", steps=4), tmp_path / "base")
    base = txt2img(txt2img_parser().parse_args(base_argv))
    assert np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(base[0])))
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(made[0])))
    with pytest.raises(UIError, match="controller 1 needs a control image"):
        gen.argv(
            GenerateRequest("toy-shapes.safetensors", "x", controls=[ControlSlot(slots[0].controller, "")]), tmp_path
        )


def test_generation_with_a_lora_and_freeu_is_the_clis(ws, tmp_path):
    """LoRA files (with their weights) and FreeU (a preset or four numbers, v2) become the CLI's --lora and
    --freeu flags and give the CLI's image, bitwise; each changes the image; bad numbers are named."""
    from helpers import write_kohya_lora

    from ldm_sce import load_model
    from ldm_sce.generate import txt2img, txt2img_parser
    from ldm_sce.ui.workspace import GenerateRequest, Generator

    write_kohya_lora(load_model(ws.weights / "toy-shapes.safetensors"), ws.weights / "detail.safetensors", seed=2)
    assert ws.names("lora") == ["detail.safetensors"]
    gen = Generator(ws)
    base = GenerateRequest("toy-shapes.safetensors", "a red circle", steps=4)
    lora = GenerateRequest("toy-shapes.safetensors", "a red circle", steps=4, loras=[("detail.safetensors", 0.6)])
    freeu = GenerateRequest("toy-shapes.safetensors", "a red circle", steps=4, freeu="1.2,1.3,0.8,0.5", freeu_v2=True)
    argv = gen.argv(lora, tmp_path)
    assert argv[argv.index("--lora") + 1] == f"{ws.weights / 'detail.safetensors'}:0.6"
    argv_freeu = gen.argv(freeu, tmp_path)
    assert argv_freeu[argv_freeu.index("--freeu") :][:3] == ["--freeu", "1.2,1.3,0.8,0.5", "--freeu-v2"]
    images, text = {}, {}
    for name, req in (("lora", lora), ("base", base), ("freeu", freeu)):
        made = gen.run(req)[0]  # the same kept model, reset between the runs
        cli_argv = gen.argv(req, tmp_path / name)
        cli = txt2img(txt2img_parser().parse_args(cli_argv))[0]
        images[name], text[name] = np.asarray(Image.open(made)), Image.open(made).text["parameters"]
        assert np.array_equal(images[name], np.asarray(Image.open(cli))), name
    assert not np.array_equal(images["base"], images["lora"]) and not np.array_equal(images["base"], images["freeu"])
    assert "LoRA: ['detail:0.6']" in text["lora"] and "LoRA" not in text["base"]
    assert "FreeU: 1.2,1.3,0.8,0.5 (official, v2)" in text["freeu"]


def test_the_generate_inputs_are_read_with_bad_numbers_named(ws):
    """The page's values become the request (tuners, LoRAs with weights, FreeU); a weight that is not a
    number is named."""
    pytest.importorskip("gradio")  # the page itself (the `ui` extra)
    from ldm_sce.ui.app import GENERATE_INPUTS, App

    values = dict.fromkeys(GENERATE_INPUTS, "")
    values |= {"ckpt": "toy-shapes.safetensors", "prompt": "x", "sampler": "ddim", "steps": 4, "scale": 7.5}
    values |= {"seed": 1, "width": 0, "height": 0, "batch": 1, "start": 0.0, "end": 1.0, "strength": 0.75}
    values |= {"tuner_scales": [["toy-style-sc.safetensors", 0.5]], "lora_weights": [["detail.safetensors", "0.6"]]}
    values |= {"freeu": "sd1", "freeu_v2": True}
    req = App(ws).request([values[k] for k in GENERATE_INPUTS])
    assert req.tuners == [("toy-style-sc.safetensors", 0.5)] and req.loras == [("detail.safetensors", 0.6)]
    assert (req.freeu, req.freeu_v2, req.controls) == ("sd1", True, [])
    values["lora_weights"] = [["detail.safetensors", "a"]]
    with pytest.raises(UIError, match="the weight of LoRA detail.safetensors is not a number"):
        App(ws).request([values[k] for k in GENERATE_INPUTS])
