"""The gateway's web page on a FLUX.2 Klein or Z-Image model, in headless
Chromium: the form fits the family — "Guidance" at the model's default,
no true CFG, the negative prompt hidden for Klein and shown for Z-Image,
the flow Euler alone, sides in steps of 16 — and a keyboard-only
generation comes back at its size with the guidance in its caption; on
Klein, reference images picked in the form travel with the request and the
image comes back.

Usage: python web_page_qwen_family.py http://127.0.0.1:PORT MODEL_NAME FAMILY GUIDANCE
"""

import base64
import io
import json
import sys

from PIL import Image

from playwright.sync_api import expect, sync_playwright

from browser import launch

URL, MODEL, FAMILY, GUIDANCE = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]


def main():
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        errors, sent = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/ui/generate") else None)
        page.goto(URL + "/")
        expect(page.get_by_label("Model")).to_have_value(MODEL)
        guidance = page.get_by_label("Guidance", exact=True)
        expect(guidance).to_be_visible()
        expect(guidance).to_have_value(GUIDANCE)
        expect(page.get_by_label("Width")).to_have_attribute("step", "16")
        expect(page.get_by_label("True CFG (with a negative prompt)")).to_be_hidden()
        negative = page.get_by_label("Negative prompt", exact=True)
        if FAMILY.startswith("klein"):
            expect(negative).to_be_hidden()
        else:
            expect(negative).to_be_visible()
        values = page.locator("#scheduler option").evaluate_all(
            "os => os.filter(o => !o.hidden).map(o => o.value)")
        assert values == ["", "flow-euler"], values

        prompt = page.get_by_label("Prompt", exact=True)
        prompt.focus()
        page.keyboard.press("Control+a")
        page.keyboard.type("a red cube")
        for field, value in (("Width", "48"), ("Height", "32"), ("Steps", "2")):
            page.get_by_label(field).fill(value)
        prompt.focus()
        page.keyboard.press("Control+Enter")
        img = page.get_by_role("img", name="Generated image 1")
        expect(img).to_be_visible(timeout=60_000)
        assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [48, 32]
        caption = page.locator("figcaption").first.inner_text()
        assert f"guidance {GUIDANCE}" in caption and "flow-euler" in caption, caption
        assert "distilled" not in caption, caption
        refs = page.get_by_label("Reference images (FLUX.2 Klein: edit from or combine, up to 16)")
        if FAMILY.startswith("klein"):
            files = []
            for i, size in enumerate(((80, 64), (64, 96))):
                buf = io.BytesIO()
                Image.new("RGB", size, (40 * i, 200, 90)).save(buf, format="PNG")
                files.append({"name": f"r{i}.png", "mimeType": "image/png", "buffer": buf.getvalue()})
            refs.set_input_files(files=files)
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_role("img", name="Generated image 1")).to_have_count(2, timeout=60_000)
            got = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size
                   for u in sent[-1]["reference_images"]]
            assert got == [(80, 64), (64, 96)], got
        else:
            expect(refs).to_be_hidden()
        assert not errors, errors
        browser.close()
    print(f"web page: {FAMILY} form and generation work")


if __name__ == "__main__":
    main()
