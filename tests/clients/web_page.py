"""The gateway's web page in headless Chromium (Debian's `chromium`, driven
by the PyPI `playwright`): a person's path through it — type a prompt,
press Generate (from the keyboard), watch the progress bar and previews,
get the image with its parameters and a download link; cancel a long one;
pick a LoRA; read it on a phone-sized screen.

Usage: python web_page.py http://127.0.0.1:PORT EXPECTED_SIDE
"""

import base64
import json
import sys
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

from browser import launch

URL, SIDE = sys.argv[1], int(sys.argv[2])


def main():
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(URL + "/")
        expect(page.get_by_label("Model")).to_have_value("sd1-tiny")
        expect(page.get_by_label("Width")).to_have_value(str(SIDE))

        # Keyboard only: focus the prompt, type, Tab to Steps, Ctrl+Enter.
        prompt = page.get_by_label("Prompt", exact=True)
        prompt.focus()
        page.keyboard.press("Control+a")
        page.keyboard.type("a red cube on a blue table")
        page.get_by_label("Steps").fill("300")
        prompt.focus()
        page.keyboard.press("Control+Enter")
        expect(page.get_by_role("progressbar")).to_be_visible()
        expect(page.locator("#preview")).to_be_visible(timeout=30_000)
        img = page.get_by_role("img", name="Generated image 1")
        expect(img).to_be_visible(timeout=60_000)
        assert page.get_by_role("progressbar").is_hidden()
        size = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert size == [SIDE, SIDE], size
        caption = page.locator("figcaption").first.inner_text()
        assert "300 steps" in caption and "seed" in caption, caption
        link = page.get_by_role("link", name="Download")
        href = link.get_attribute("href")
        assert link.get_attribute("download", timeout=1000).endswith(".png")
        png = base64.b64decode(href.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        # The seed it used is now in the seed field.
        assert page.get_by_label("Seed", exact=True).input_value() != ""

        # Cancel a long one: the server stops it (it leaves the running
        # jobs A1111's /progress lists long before its 1000 steps), and no
        # image comes.
        page.get_by_label("Steps").fill("1000")
        page.get_by_label("Width").fill("256")
        page.get_by_label("Height").fill("256")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("status")).to_contain_text("Step 5", timeout=30_000)
        running = json.load(urllib.request.urlopen(URL + "/sdapi/v1/progress?skip_current_image=true"))
        # (PNDM, the model's own scheduler, takes 1001 UNet steps for 1000.)
        assert running["state"]["job_count"] == 1 and running["state"]["sampling_steps"] >= 1000, running
        page.get_by_role("button", name="Cancel").click()
        expect(page.get_by_role("status")).to_have_text("Cancelled")
        deadline = time.time() + 30  # the step in progress ends first; slow on a loaded machine
        while True:
            p_ = json.load(urllib.request.urlopen(URL + "/sdapi/v1/progress?skip_current_image=true"))
            if p_["state"]["job_count"] == 0:
                break
            assert p_["state"]["sampling_step"] < 900, f"the cancelled generation ran on: {p_}"
            assert time.time() < deadline, f"still running after cancel: {p_}"
            time.sleep(0.05)
        expect(page.get_by_role("button", name="Generate")).to_be_enabled()
        assert page.get_by_role("img", name="Generated image 1").count() == 1

        page.get_by_label("Height").fill(str(SIDE))
        # A size off the grid is caught in the page; one the server refuses
        # comes back as an error naming the field.
        page.get_by_label("Steps").fill("2")
        page.get_by_label("Width").fill("63")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("status")).to_contain_text("Check Width")
        page.get_by_label("Width").fill("4096")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("status")).to_contain_text("Error: width", timeout=30_000)

        # A LoRA from the server's folder, at a scale: the server applies it
        # (it refuses names it lacks) and the caption says so.
        expect(page.get_by_label("LoRA (Ctrl/⌘ for several)")).to_be_visible()
        page.get_by_label("LoRA (Ctrl/⌘ for several)").select_option("ink")
        page.get_by_label("LoRA scale").fill("0.5")
        page.get_by_label("Width").fill(str(SIDE))
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("figcaption").first).to_contain_text("LoRA ink 0.5", timeout=60_000)

        # A phone: nothing wider than the screen.
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(URL + "/")
        expect(phone.get_by_label("Model")).to_have_value("sd1-tiny")
        wide = phone.evaluate("document.documentElement.scrollWidth > document.documentElement.clientWidth")
        assert not wide, "the page scrolls sideways on a phone"
        assert not errors, errors
        browser.close()
    print("web page: ok")


if __name__ == "__main__":
    main()
