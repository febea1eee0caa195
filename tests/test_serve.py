"""`cxrtune serve` as a user meets it: the real server process serving the registered model
of a finished (tiny, real) search, driven by Debian's headless Chromium through
Playwright, and by plain HTTP for what a browser does not show (status codes, limits)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from PIL import Image
from urllib3 import encode_multipart_formdata

from servers import cxrtune, free_port, json_lines, kill_group

MODEL = "models:/cxrtune-best/1"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LIMIT_MB = 1
_URL = re.compile(r"at (http://[^ ]+/) ;")


def start_serve(cwd: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`cxrtune serve` in a subprocess on a free port: (the process, its URL from the log)."""
    env = {**os.environ, "CXRTUNE_HOME": str(cwd / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cxrtune.cli", "serve", "--model", MODEL, "--port", "0", *args],
                            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = _URL.search(log.read_text())
        if found and _answers(found.group(1) + "health"):
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    kill_group(proc)
    raise AssertionError(f"cxrtune serve did not start: {log.read_text()[-3000:]}")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def server(searched, tmp_path_factory):
    """The served registered model: (URL, the search's folder, the server's log)."""
    cwd, _ = searched
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, url = start_serve(cwd, log, "--max-upload-mb", str(LIMIT_MB))
    yield url, cwd, log
    kill_group(proc)


@pytest.fixture(scope="module")
def uploads(searched, tmp_path_factory) -> dict[str, Path]:
    """What a user uploads: a synthetic X-ray (8-bit PNG), the same pixels as a 16-bit PNG, a
    colour JPEG photo, an 8x8 icon, and a text file under an image's name."""
    folder = tmp_path_factory.mktemp("uploads")
    cwd, _ = searched
    test_image = next((cwd / "home").rglob("*.png"))
    xray = folder / "xray.png"
    xray.write_bytes(test_image.read_bytes())
    wide = (cv2.imread(str(test_image), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "xray16.png"), wide)
    assert Image.open(folder / "xray16.png").mode.startswith("I")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), np.uint8)).save(folder / "photo.jpg", quality=90)
    cv2.imwrite(str(folder / "icon.png"), (np.arange(64).reshape(8, 8) * 4).astype(np.uint8))
    (folder / "report.png").write_text("a text file, not an image")
    return {"xray": xray, "xray16": folder / "xray16.png", "photo": folder / "photo.jpg",
            "icon": folder / "icon.png", "text": folder / "report.png"}


def predicted_by_cli(cwd: Path, *images: Path) -> dict[str, dict]:
    proc = cxrtune(cwd, "predict", "--model", MODEL, "--json", *map(str, images))
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return {Path(r["image"]).name: r for r in json_lines(proc)}


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (CI installs Debian's)")
def test_the_page_in_chromium_shows_what_cxrtune_predict_prints(server, uploads, tmp_path):
    from playwright.sync_api import sync_playwright

    url, cwd, _ = server
    images = ("xray", "xray16", "photo", "icon")
    expected = predicted_by_cli(cwd, *(uploads[k] for k in images))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            assert "not a medical device" in page.inner_text("#disclaimer")
            page.set_input_files("input#images", [str(uploads[k]) for k in (*images, "text")])
            with page.expect_navigation():
                page.click("button[type=submit]")
            shown = _results(page)
            assert "not a medical device" in page.inner_text("#disclaimer")  # on the answer page too
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            cams_loaded = page.eval_on_selector_all("figure.cam img", "imgs => imgs.map(i => i.naturalWidth)")
        finally:
            browser.close()

    assert list(shown) == ["xray.png", "xray16.png", "photo.jpg", "icon.png", "report.png"]
    for name in list(shown)[:4]:  # the probabilities shown are cxrtune predict's, exactly
        assert shown[name]["probabilities"] == expected[name]["probabilities"]
        assert shown[name]["predicted"] == expected[name]["predicted"]
        assert shown[name]["text"] == [f"{p:.4f}" for p in expected[name]["probabilities"].values()]
        assert abs(sum(shown[name]["probabilities"].values()) - 1) < 1e-5
    assert "not an image" in shown["report.png"]["error"] or "cannot be decoded" in shown["report.png"]["error"]
    assert "8x8 px, smaller than the model's 32 px input: upscaled" in shown["icon.png"]["note"]
    assert all(shown[name]["note"] is None for name in ("xray.png", "xray16.png", "photo.jpg"))
    assert len(cams_loaded) == 4 and all(w > 0 for w in cams_loaded)  # a Grad-CAM overlay per image
    picture = np.asarray(Image.open(tmp_path / "serve.png").convert("RGB")).astype(float)
    assert picture.std() > 20 and (np.abs(picture[..., 0] - picture[..., 2]) > 60).mean() > 0.005  # in colour


def _results(page) -> dict[str, dict]:
    """Each result section as the page shows it: probabilities (the rows' exact values and
    the text shown), the predicted class, or the error."""
    return page.eval_on_selector_all("section.result", """sections => Object.fromEntries(sections.map(s => {
        const rows = [...s.querySelectorAll('tr[data-class]')];
        const error = s.querySelector('.image-error');
        return [s.dataset.image, error ? {error: error.innerText} : {
            probabilities: Object.fromEntries(rows.map(r => [r.dataset.class, Number(r.dataset.probability)])),
            text: rows.map(r => r.querySelector('td.value').innerText.trim()),
            predicted: s.querySelector('.predicted').innerText.trim(),
            note: s.querySelector('.note') ? s.querySelector('.note').innerText : null}];
    }))""")


def test_the_json_api_answers_as_cxrtune_predict(server, uploads):
    url, cwd, _ = server
    expected = predicted_by_cli(cwd, uploads["xray"])["xray.png"]
    with open(uploads["xray"], "rb") as f:
        answer = requests.post(url + "api/predict", files=[("images", ("xray.png", f, "image/png"))], timeout=60)
    assert answer.status_code == 200
    (result,) = answer.json()["results"]
    assert result["probabilities"] == expected["probabilities"] and result["predicted"] == expected["predicted"]
    assert result["cam_png_base64"].startswith("iVBORw0KGgo")  # a PNG


def test_bad_uploads_get_a_message_and_a_4xx_never_a_500(server, uploads):
    url, _, log = server
    text = requests.post(url, files=[("images", ("report.png", b"%PDF-1.4 not an image", "image/png"))], timeout=30)
    assert text.status_code == 400 and "report.png" in text.text and "Cannot be read" in text.text
    empty = requests.post(url, files=[("images", ("", b"", "application/octet-stream"))], timeout=30)
    assert empty.status_code == 400 and "no images uploaded" in empty.text
    not_a_form = requests.post(url + "api/predict", json={"image": "xray.png"}, timeout=30)
    assert not_a_form.status_code == 400 and "no images uploaded" in not_a_form.json()["error"]
    # over the limit: refused by its declared size, and as it streams when it declares none
    big = np.random.default_rng(0).integers(0, 255, (LIMIT_MB * 1024 * 1024 + 1000,), np.uint8).tobytes()
    over = requests.post(url, files=[("images", ("big.png", big, "image/png"))], timeout=30)
    assert over.status_code == 413 and f"limit of {LIMIT_MB} MB" in over.text and "--max-upload-mb" in over.text
    body, content_type = encode_multipart_formdata([("images", ("big.png", big, "image/png"))])
    streamed = requests.post(url + "api/predict", data=iter([body[:600_000], body[600_000:]]), timeout=30,
                             headers={"Content-Type": content_type})  # chunked: no Content-Length
    assert streamed.status_code == 413 and "--max-upload-mb" in streamed.json()["error"]
    assert "Traceback" not in log.read_text()


def test_serve_listens_on_this_machine_only_unless_told_and_says_when_it_cannot(server, searched, tmp_path):
    url, cwd, log = server
    assert url.startswith("http://127.0.0.1:")  # the default host: no other machine can reach it
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    taken = cxrtune(cwd, "serve", "--model", MODEL, "--port", str(port), timeout=120)
    assert taken.returncode == 2 and f"--port {port}: cannot listen there" in taken.stderr
    missing = cxrtune(cwd, "serve", "--model", "models:/cxrtune-best/99", "--port", str(free_port()), timeout=120)
    assert missing.returncode == 2 and "models:/cxrtune-best/99: not found" in missing.stderr
    for result in (taken, missing):
        assert "Traceback" not in result.stderr
