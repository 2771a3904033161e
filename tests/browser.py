"""Rendering a page in headless Chromium (Debian's ``chromium``) for tests: console messages and pixels."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install -y chromium): the page is not rendered in a real "
           "browser by this run")


def render(page: Path, shot: Path, width: int = 1280, height: int = 6000) -> tuple[list[str], np.ndarray]:
    """Screenshot ``page`` in a ``width`` x ``height`` window: (console lines, greyscale pixels (height, width))."""
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
         "--v=0", f"--screenshot={shot}", f"--window-size={width},{height}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return console, np.asarray(Image.open(shot).convert("L"))
