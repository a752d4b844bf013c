"""The headless browser the web-page clients drive: Debian's `chromium`
(which `make setup` installs), found on PATH."""

import shutil


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no chromium on PATH: make setup installs Debian's chromium")
