"""The gateway's web page in headless Chromium with a model whose services
serve ControlNets and IP-Adapters: the ControlNet and image-prompt rows
appear with what is served; a ControlNet with its control image and weight
gives diffusers' image for that request, and so does an IP-Adapter with its
picture and scale; the caption names them.

Usage: python web_page_controls.py http://127.0.0.1:PORT DIR
(DIR: `hint.png`, `picture.png`, and diffusers' `controlnet.png` —
edges at 0.7 — and `ip.png` — face at 0.7 —, seed 1, 8 steps.)
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


def shown(page, i):
    src = page.get_by_role("img", name=f"Generated image 1").nth(i).get_attribute("src")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def main():
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(URL + "/")
        expect(page.get_by_label("ControlNet", exact=True)).to_be_visible()
        expect(page.get_by_label("Image prompt (IP-Adapter)")).to_be_visible()
        page.get_by_label("Prompt", exact=True).fill("a photograph of an astronaut riding a horse")
        page.get_by_label("Steps").fill("8")
        page.get_by_label("Random seed").uncheck()
        page.get_by_label("Seed", exact=True).fill("1")

        page.get_by_label("ControlNet", exact=True).select_option("edges")
        page.get_by_label("Control image").set_input_files(str(DIR / "hint.png"))
        page.get_by_label("Control weight").fill("0.7")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("img", name="Generated image 1")).to_be_visible(timeout=60_000)
        caption = page.locator("figcaption").first.inner_text()
        assert "ControlNet edges 0.7" in caption, caption
        diff = np.abs(px(shown(page, 0)) - px(Image.open(DIR / "controlnet.png")))
        assert diff.max() <= 2, f"the page's ControlNet image differs from diffusers': max {diff.max()}"

        page.get_by_label("ControlNet", exact=True).select_option("")
        page.get_by_label("Image prompt (IP-Adapter)").select_option("face")
        page.get_by_label("Image prompt picture").set_input_files(str(DIR / "picture.png"))
        page.get_by_label("Image prompt scale").fill("0.7")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("img", name="Generated image 1")).to_have_count(2, timeout=60_000)
        caption = page.locator("figcaption").first.inner_text()
        assert "IP-Adapter face 0.7" in caption and "ControlNet" not in caption, caption
        diff = np.abs(px(shown(page, 0)) - px(Image.open(DIR / "ip.png")))
        assert diff.max() <= 2, f"the page's image prompt differs from diffusers': max {diff.max()}"
        assert not errors, errors
        browser.close()
    print("ok")


main()
