"""The gateway's web page on sdserve's default model, in headless Chromium:
it proposes a prompt the model draws (its sdserve.json's first example);
with a picture loaded, a brush paints the mask over it (the eraser takes
some back) and the generation sends the picture and that mask, strength 1;
"Enlarge canvas" outpaints (a larger picture, its new border masked); the
hires-fix toggle sends a second pass and the image comes back larger.

Usage: python web_page_inpaint.py http://127.0.0.1:PORT
"""

import base64
import io
import json
import sys

import numpy as np
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from browser import launch

URL = sys.argv[1]


def decode(data_url):
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def main():
    picture = io.BytesIO()
    y, x = np.mgrid[0:32, 0:32]
    Image.fromarray(np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)).save(picture, format="PNG")
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        errors, sent = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/ui/generate") else None)
        page.goto(URL + "/")
        prompt = page.get_by_label("Prompt", exact=True)
        expect(prompt).to_have_value("grinning face with big eyes")

        page.get_by_label("Image to start from (optional)").set_input_files(
            files=[{"name": "p.png", "mimeType": "image/png", "buffer": picture.getvalue()}])
        mask = page.get_by_role("img", name="Mask: paint what to repaint")
        expect(mask).to_be_visible()
        box = mask.bounding_box()
        # A stroke across the middle, then the eraser over its left end.
        page.get_by_label("Brush size").fill("4")
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.5, steps=8)
        page.mouse.up()
        page.get_by_label("Erase").check()
        page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
        expect(page.get_by_label("Strength")).to_have_value("1")
        page.get_by_role("button", name="Generate").click()
        img = page.get_by_role("img", name="Generated image 1")
        expect(img).to_be_visible(timeout=60_000)
        body = sent[-1]
        m = np.asarray(decode(body["mask"]).convert("L"))
        assert m.shape == (32, 32), m.shape
        assert m[16, 16] > 200 and m[16, 24] > 200, "the stroke is not in the mask"
        assert m[2, 2] == 0 and m[30, 30] == 0, "the mask is white where nothing was painted"
        assert m[16, 6] < 128, "the eraser took nothing back"
        assert body["strength"] == 1
        assert decode(body["init_image"]).size == (32, 32)

        # Outpainting: the canvas enlarged by 8 on each side, its border masked.
        page.get_by_label("Enlarge each side by (px)").fill("8")
        page.get_by_role("button", name="Enlarge canvas").click()
        expect(page.get_by_label("Width")).to_have_value("48")
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("figure")).to_have_count(2, timeout=60_000)
        newest = page.get_by_role("img", name="Generated image 1").first
        assert newest.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [48, 48]
        m = np.asarray(decode(sent[-1]["mask"]).convert("L"))
        assert m.shape == (48, 48) and m[1, 1] == 255 and m[47, 20] == 255 and m[10, 10] == 0, m[::8, ::8]
        assert decode(sent[-1]["init_image"]).size == (48, 48)

        # Hires fix on a text-to-image generation.
        page.get_by_label("Image to start from (optional)").set_input_files(files=[])
        page.get_by_label("Hires fix").check()
        page.get_by_label("Upscale by").fill("2")
        page.get_by_label("Hires step count (0: same)").fill("2")
        page.get_by_label("Width").fill("32")
        page.get_by_label("Height").fill("32")
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("figure")).to_have_count(3, timeout=60_000)
        newest = page.get_by_role("img", name="Generated image 1").first
        assert newest.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
        assert sent[-1]["hires"]["scale"] == 2 and "mask" not in sent[-1]
        caption = page.locator("figcaption").first.inner_text()
        assert "hires Latent to 64×64" in caption, caption
        assert not errors, errors
        browser.close()
    print("web page: mask painting, outpainting and hires fix work")


if __name__ == "__main__":
    main()
