"""The web UI end to end: `tools/webui.py` served on localhost over a fresh workspace (the embedded toy model
and tuners in weights/), driven in headless Chromium by Playwright as a person would use it. Every image it
makes is compared with the CLI's on the same settings (bitwise: the UI calls the same functions).

Needs the `ui` and `test` extras and Debian's chromium (`.ci/run` installs them and sets
LDM_SCE_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping). With
LDM_SCE_SCREENSHOTS=docs/figures the screenshots of the tabs are written there."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.slow


def _require():
    missing = []
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python package {module} (pip install -e '.[ui,test]')")
    if not CHROMIUM.is_file():
        missing.append("Debian's chromium (apt-get install chromium)")
    if missing:
        if os.environ.get("LDM_SCE_REQUIRE_BROWSER"):
            pytest.fail("the browser tests need " + ", ".join(missing))
        pytest.skip("the browser tests need " + ", ".join(missing))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require()
    root = tmp_path_factory.mktemp("webui")
    (root / "weights").mkdir()
    for name in ("toy-shapes.safetensors", "toy-style-sc.safetensors", "toy-canny-csc.safetensors"):
        shutil.copyfile(ROOT / "weights" / name, root / "weights" / name)
    from helpers import write_kohya_lora

    from ldm_sce import load_model

    write_kohya_lora(load_model(root / "weights" / "toy-shapes.safetensors"), root / "weights" / "detail.safetensors")
    shapes = root / "data" / "circles"
    shapes.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(4):
        img = Image.new("RGB", (64, 64), (235, 235, 235))
        x, y = rng.integers(8, 40, 2)
        img.paste((220, 30, 30) if k % 2 else (30, 40, 220), (int(x), int(y), int(x) + 20, int(y) + 20))
        img.save(shapes / f"{k}.png")
        (shapes / f"{k}.txt").write_text(f"a {'red' if k % 2 else 'blue'} square zqx style")
    port = _free_port()
    cmd = [sys.executable, str(ROOT / "tools" / "webui.py"), "--root", str(root), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"webui.py exited: {proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("webui.py did not answer within 180 s")
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    flags += ["--disable-sync", "--no-first-run", "--disable-quic"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        page.goto(server[0])
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def test_binds_to_this_machine_only_by_default(server):
    """The server listens on 127.0.0.1 (read from the kernel's socket table), not on every address."""
    port = int(server[0].rsplit(":", 1)[1])
    listening = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, p = local.split(":")
        if int(p, 16) == port and state == "0A":  # LISTEN
            listening.append(address)
    assert listening == ["0100007F"]  # 127.0.0.1, little-endian hex


def _screenshot(page, name):
    folder = os.environ.get("LDM_SCE_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def _set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Enter")


def _choose(page, elem_id, option):
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def _generate(page, root, before: int) -> Path:
    """Click Generate and wait for the new sample file; returns it."""
    page.click("#generate")
    page.wait_for_function(
        "n => document.querySelector('#gen-status') && document.querySelector('#gen-status').innerText.startsWith('Done')"
        " && document.querySelectorAll('#gallery img').length > 0",
        arg=before,
    )
    samples = sorted((root / "outputs" / "txt2img" / "samples").glob("*.png"))
    assert len(samples) == before + 1
    page.wait_for_function("() => !document.querySelector('#gen-status').innerText.startsWith('Sampling')")
    return samples[-1]


def _cli(root, tmp_path, *flags) -> Path:
    out = tmp_path / f"cli{len(list(tmp_path.iterdir()))}"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "txt2img.py"),
        "--ckpt",
        str(root / "weights" / "toy-shapes.safetensors"),
    ]
    cmd += ["--prompt", "a large red circle", "--ddim_steps", "10", "--seed", "42", "--outdir", str(out), "--skip_grid"]
    r = subprocess.run([*cmd, "--quiet", *map(str, flags)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "samples" / "00000.png"


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_tuner_control_and_errors(page, server, tmp_path):
    url, root = server
    _set_number(page, "steps", 10)

    # a prompt makes an image on the toy model: the CLI's image, with the CLI's PNG parameters
    base = _generate(page, root, 0)
    cli_base = _cli(root, tmp_path)
    assert np.array_equal(_pixels(base), _pixels(cli_base))
    assert Image.open(base).text["parameters"] == Image.open(cli_base).text["parameters"]
    assert "Steps: 10" in Image.open(base).text["parameters"]

    # an SC-Tuner changes it (scale 1 from the table), as --tuner does
    _choose(page, "tuners", "toy-style-sc.safetensors")
    page.wait_for_function("() => document.querySelector('#tuner-scales').innerText.includes('toy-style-sc')")
    tuned = _generate(page, root, 1)
    assert not np.array_equal(_pixels(tuned), _pixels(base))
    cli_tuned = _cli(root, tmp_path, "--tuner", root / "weights" / "toy-style-sc.safetensors", "--tuner-scale", 1.0)
    assert np.array_equal(_pixels(tuned), _pixels(cli_tuned))
    page.locator("#tuners button.token-remove, #tuners .token-remove").first.click()  # back to no tuner

    # a LoRA file (weight 1 from the table) and FreeU's SD1 preset, as --lora and --freeu do
    page.get_by_text("LoRA and FreeU").click()
    _choose(page, "loras", "detail.safetensors")
    page.wait_for_function("() => document.querySelector('#lora-weights').innerText.includes('detail')")
    _choose(page, "freeu", "sd1")
    lora_freeu = _generate(page, root, 2)
    lora_path = root / "weights" / "detail.safetensors"
    cli_lora_freeu = _cli(root, tmp_path, "--lora", f"{lora_path}:1.0", "--freeu", "sd1")
    assert np.array_equal(_pixels(lora_freeu), _pixels(cli_lora_freeu))
    assert "LoRA: ['detail:1']" in Image.open(lora_freeu).text["parameters"]
    page.locator("#loras button.token-remove, #loras .token-remove").first.click()
    page.locator("#freeu input").first.fill("")
    page.locator("#freeu input").first.press("Enter")

    # a control image is previewed (canny edges: black and white) and used
    control = tmp_path / "control.png"
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((0, 0, 0), (10, 30, 50, 50))
    img.save(control)
    page.get_by_text("Controller 2 (multi-condition)").click()  # a second controller slot
    page.locator("#controller-2").wait_for()
    _choose(page, "controller", "toy-canny-csc.safetensors")
    page.locator("#control-image input[type=file]").set_input_files(str(control))
    page.wait_for_selector("#preview img")
    controlled = _generate(page, root, 3)
    assert not np.array_equal(_pixels(controlled), _pixels(base))
    cli_controlled = _cli(
        root, tmp_path, "--control", root / "weights" / "toy-canny-csc.safetensors", "--control-image", control
    )
    assert np.array_equal(_pixels(controlled), _pixels(cli_controlled))
    _screenshot(page, "webui_generate.png")

    # a bad setting: a message in the page, and the server goes on generating
    page.locator("#prompt textarea").fill("")
    page.click("#generate")
    page.get_by_text("the prompt is empty").first.wait_for()
    page.locator(".toast-close").first.click()
    page.locator("#prompt textarea").fill("a large red circle")
    again = _generate(page, root, 4)
    assert np.array_equal(_pixels(again), _pixels(controlled))

    # an image of the gallery sent to img2img: SDEdit from it, with the CLI's parameters
    page.locator("#gallery img").first.click()
    page.click("#to-img2img")
    page.wait_for_selector("#init-image img", state="attached")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#gen-status').innerText.includes('img2img')")
    made = sorted((root / "outputs" / "img2img" / "samples").glob("*.png"))
    assert len(made) == 1 and "Denoising strength: 0.75" in Image.open(made[0]).text["parameters"]
    # ... or used as the control image (its condition previewed)
    before = page.locator("#preview img").get_attribute("src")
    page.click("#to-control")
    page.wait_for_function(
        "src => document.querySelector('#preview img') && document.querySelector('#preview img').src !== src",
        arg=before,
    )


def test_tuners_tab_lists_weights_with_their_metadata(page):
    page.get_by_role("tab", name="Tuners").click()
    page.wait_for_function("() => document.querySelector('#weights-table').innerText.includes('toy-canny-csc')")
    text = page.locator("#weights-table").inner_text()
    assert "toy-style-sc.safetensors" in text and "checkpoint" in text and "canny" in text
    page.get_by_role("tab", name="Generate").click()


def test_short_training_run_makes_a_selectable_tuner(page, server):
    url, root = server
    page.get_by_role("tab", name="Train").click()
    page.locator("#run-name textarea, #run-name input").first.fill("circles-sc")
    # upload images with captions (and a broken file: left out, named in the page) as a new dataset
    files = sorted((root / "data" / "circles").iterdir())
    broken = root / "outputs" / "broken.png"
    broken.write_bytes(b"not a png")
    page.get_by_text("Upload images with captions").click()
    page.locator("#upload input[type=file]").set_input_files([str(f) for f in files] + [str(broken)])
    page.locator("#upload-name textarea, #upload-name input").first.fill("uploaded")
    page.click("#save-upload")
    page.get_by_text("Saved 4 image(s) to data/uploaded").wait_for()
    assert "left out broken.png" in page.locator("#upload-msg").inner_text()
    assert sorted(p.name for p in (root / "data" / "uploaded").iterdir()) == [f.name for f in files]
    _choose(page, "dataset", "uploaded")
    for elem_id, value in (("train-steps", 4), ("resolution", 64), ("train-batch", 2), ("lr", 0.001)):
        _set_number(page, elem_id, value)
    page.locator("#val-prompt input, #val-prompt textarea").first.fill("a red square zqx style")
    page.click("#train-start")
    page.wait_for_function("() => document.querySelector('#train-status').innerText.includes(': done')")
    assert (root / "weights" / "circles-sc.safetensors").is_file()
    page.wait_for_selector("#validation img")
    page.wait_for_selector("#loss-plot canvas, #loss-plot svg")
    log = (root / "outputs" / "train" / "circles-sc" / "log.jsonl").read_text()
    assert log.count('"loss"') == 4
    _screenshot(page, "webui_train.png")
    page.get_by_role("tab", name="Generate").click()
    _choose(page, "tuners", "circles-sc.safetensors")  # the finished tuner is selectable
    page.wait_for_function("() => document.querySelector('#tuner-scales').innerText.includes('circles-sc')")
