"""The gateway's web page on a FLUX.1-dev model, in headless Chromium: the
form fits the family — "Distilled guidance" (3.5), a True CFG field, no
negative prompt until true CFG is above 1, sides in steps of 16 — and a
keyboard-only generation comes back with FLUX's settings in its caption.

Usage: python web_page_flux.py http://127.0.0.1:PORT MODEL_NAME
"""

import sys

from playwright.sync_api import expect, sync_playwright

from browser import launch

URL, MODEL = sys.argv[1], sys.argv[2]


def main():
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(URL + "/")
        expect(page.get_by_label("Model")).to_have_value(MODEL)
        guidance = page.get_by_label("Distilled guidance")
        expect(guidance).to_be_visible()
        expect(guidance).to_have_value("3.5")
        expect(page.get_by_label("Steps")).to_have_value("28")
        expect(page.get_by_label("Width")).to_have_attribute("step", "16")
        true_cfg = page.get_by_label("True CFG (with a negative prompt)")
        expect(true_cfg).to_be_visible()
        negative = page.get_by_label("Negative prompt", exact=True)
        expect(negative).to_be_hidden()
        true_cfg.fill("2")
        expect(negative).to_be_visible()
        true_cfg.fill("1")
        expect(negative).to_be_hidden()

        prompt = page.get_by_label("Prompt", exact=True)
        prompt.focus()
        page.keyboard.press("Control+a")
        page.keyboard.type("a photograph of an astronaut riding a horse")
        for field, value in (("Width", "32"), ("Height", "32"), ("Steps", "3")):
            page.get_by_label(field).fill(value)
        prompt.focus()
        page.keyboard.press("Control+Enter")
        img = page.get_by_role("img", name="Generated image 1")
        expect(img).to_be_visible(timeout=60_000)
        assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 32]
        caption = page.locator("figcaption").first.inner_text()
        assert "distilled guidance 3.5, true CFG 1" in caption and "flow-euler" in caption, caption
        assert not errors, errors
        browser.close()
    print("web page: FLUX form and generation work")


if __name__ == "__main__":
    main()
