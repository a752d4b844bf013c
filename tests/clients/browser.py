"""The headless browser the web-page clients drive: Debian's `chromium`
(which `make setup` installs), found on PATH."""

import shutil

ARGS = ["--no-sandbox", "--disable-gpu"]


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no chromium on PATH: make setup installs Debian's chromium")


def launch(playwright):
    """Headless Chromium as the tests run it."""
    return playwright.chromium.launch(executable_path=chromium(), headless=True, args=ARGS)
