"""The gateway's web page in headless Chromium on a FLUX.1 model whose
denoiser serves a union ControlNet: choosing it shows its control types
(none for an ordinary ControlNet); the union with a control type, its
control image and weight gives the gRPC stack's image for that request
(itself equal to diffusers' in the other tests); the caption names the net
and its type.

Usage: python web_page_flux_controls.py http://127.0.0.1:PORT DIR
(DIR: `hint.png` and `union.png` — gRPC's image for the prompt below, 32×32,
seed 63, 4 steps, guidance 3.5, the union at 0.8 with control type 1.)
"""

import base64
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from browser import launch

URL, DIR = sys.argv[1], Path(sys.argv[2])


def px(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def main():
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(URL + "/")
        net = page.get_by_label("ControlNet", exact=True)
        expect(net).to_be_visible()
        net.select_option("canny")
        expect(page.get_by_label("Control type")).to_be_hidden()
        net.select_option("union")
        expect(page.get_by_label("Control type")).to_be_visible()
        assert page.get_by_label("Control type").locator("option").count() == 3
        page.get_by_label("Control type").select_option("1")
        page.get_by_label("Prompt", exact=True).fill("a photograph of an astronaut riding a horse")
        page.get_by_label("Width").fill("32")
        page.get_by_label("Height").fill("32")
        page.get_by_label("Steps").fill("4")
        page.get_by_label("Distilled guidance").fill("3.5")
        page.get_by_label("Random seed").uncheck()
        page.get_by_label("Seed", exact=True).fill("63")
        page.get_by_label("Control image").set_input_files(str(DIR / "hint.png"))
        page.get_by_label("Control weight").fill("0.8")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("img", name="Generated image 1")).to_be_visible(timeout=60_000)
        caption = page.locator("figcaption").first.inner_text()
        assert "ControlNet union/1 0.8" in caption, caption
        src = page.get_by_role("img", name="Generated image 1").first.get_attribute("src")
        shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        diff = np.abs(px(shown) - px(Image.open(DIR / "union.png")))
        assert diff.max() == 0, f"the page's union ControlNet image differs from gRPC's: max {diff.max()}"
        assert not errors, errors
        browser.close()
    print("ok")


main()
