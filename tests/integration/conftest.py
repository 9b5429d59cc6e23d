"""Real Chromium for the browser tests: Debian's, started once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("COMFYLB_CHROMIUM", "/usr/bin/chromium")
# without the background-networking flags Chromium keeps calling out to hosts this machine cannot reach
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
async def browser():
    playwright = pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium is needed at {CHROMIUM} (scripts/test.sh installs it)")
    async with playwright.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        await b.close()


@pytest.fixture
def shots(workdir):
    """Where screenshots go: docs/ when COMFYLB_SCREENSHOT_DIR says so, else the test dir."""
    return Path(os.environ.get("COMFYLB_SCREENSHOT_DIR") or workdir)
