"""The web page in headless Chromium: type a prompt, upload a reference, generate, watch progress, get the picture.

Needs Debian's `chromium` (apt-get install -y chromium) and the `playwright` Python package; skipped without them.
"""

import io
import shutil

import httpx
import pytest
from PIL import Image

from featherflux.serve.api import create_app
from tests.serve.fakes import FakePipeline, LiveServer, seed_colour

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason="no chromium binary; install Debian's `chromium` package to run the page test",
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def test_page_generates_with_live_progress_and_shows_the_picture(tmp_path):
    pipe = FakePipeline(step_seconds=0.15)
    reference = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(reference, format="PNG")
    with LiveServer(create_app(pipe, output_dir=tmp_path)) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.fill("#prompt", "a lighthouse at dusk")
            page.fill("#width", "80")
            page.fill("#height", "64")
            page.fill("#steps", "8")
            page.fill("#seed", "42")
            page.set_input_files(
                "#references", files=[{"name": "ref.png", "mimeType": "image/png", "buffer": reference.getvalue()}]
            )
            page.click("#generate")
            page.wait_for_function(
                "() => { const v = document.getElementById('progress').value; return v > 0 && v < 1; }", timeout=20_000
            )
            assert page.text_content("#status").startswith("Step ")
            page.wait_for_selector("#gallery figure img", timeout=20_000)
            page.wait_for_function("() => document.querySelector('#gallery img').naturalWidth > 0")
            assert page.text_content("#status") == "Done."
            assert page.eval_on_selector("#progress", "p => p.value") == 1
            caption = page.text_content("#gallery figcaption")
            assert "a lighthouse at dusk" in caption and "80x64" in caption and "seed 42" in caption
            href = page.get_attribute("#gallery a.download", "href")
        finally:
            browser.close()
        assert href.startswith(live.url + "/v1/files/")
        png = httpx.get(href).content
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (80, 64) and image.getpixel((0, 0)) == seed_colour(42, "a lighthouse at dusk")
    assert pipe.calls[0]["references"] == 1


def test_page_sends_a_mask_and_strength_for_inpainting(tmp_path):
    pipe = FakePipeline()
    picture, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(picture, format="PNG")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(mask, format="PNG")  # all transparent: repaint everything
    with LiveServer(create_app(pipe, output_dir=tmp_path)) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.fill("#prompt", "a red ball")
            page.fill("#width", "64")
            page.fill("#height", "64")
            page.fill("#steps", "2")
            page.fill("#strength", "0.5")
            page.set_input_files("#references", files=[{"name": "a.png", "mimeType": "image/png",
                                                        "buffer": picture.getvalue()}])
            page.set_input_files("#mask", files=[{"name": "m.png", "mimeType": "image/png", "buffer": mask.getvalue()}])
            page.click("#generate")
            page.wait_for_selector("#gallery figure img", timeout=20_000)
        finally:
            browser.close()
    (call,) = pipe.calls
    assert call["strength"] == 0.5 and call["mask"].getextrema() == (255, 255)
