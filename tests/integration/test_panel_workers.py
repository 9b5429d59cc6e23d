"""Local workers in the panel (issue 15, item 1), in real headless Chromium: each worker's
state and restarts, its log on click, and a restart button; over stand-in ComfyUI workers
(tests/fakeworkers.py) so the page is tested in seconds."""
from __future__ import annotations

import pytest

from tests.fakeworkers import lb_over_fake_workers
from tests.integration.test_panel import open_page

pytestmark = pytest.mark.real


async def test_the_panel_shows_workers_their_log_and_restarts_one(browser, tmp_path):
    async with lb_over_fake_workers(tmp_path) as (url, cluster):
        page, errors = await open_page(browser, url + "/", width=460)
        peer = page.locator('.comfylb .cl-peer[data-peer="worker-0"]')
        await peer.locator(".cl-worker").wait_for(timeout=15000)
        assert "running" in await peer.locator(".cl-worker-state").inner_text()
        assert "0 restarts" in await peer.locator(".cl-worker").inner_text()
        assert await peer.locator('button[data-act="remove"]').count() == 0  # a worker goes with the config
        await peer.locator('button[data-act="log"]').click()
        await peer.locator(".cl-log").wait_for(timeout=5000)
        assert "stand-in ComfyUI" in await peer.locator(".cl-log").inner_text()
        await peer.locator('button[data-act="restart"]').click()
        await page.wait_for_function(
            """() => /1 restart\\b/.test(document.querySelector('.cl-peer[data-peer="worker-0"] .cl-worker')?.textContent)""",
            timeout=30000)
        assert not errors, errors
        await page.close()
