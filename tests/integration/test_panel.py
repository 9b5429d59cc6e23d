"""The panel in real headless Chromium: in a real coordinator ComfyUI's frontend and on
the standalone page, each with two real peers."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.client import Client, sleep_prompt

pytestmark = pytest.mark.real

CHROMIUM = os.environ.get("COMFYLB_CHROMIUM", "/usr/bin/chromium")
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


async def open_page(browser, url: str, width: int = 1280):
    page = await browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(url)
    return page, errors


async def exercise_panel(page, base_url: str, peers, root: str, while_running=None) -> None:
    """The checks both hosts must pass: see both peers, disable one, add one, see progress."""
    panel = page.locator(root)
    for p in peers[:2]:
        await panel.locator(f'.cl-peer[data-peer="{p.name}"].cl-healthy').wait_for(timeout=30000)
    assert await panel.locator(".cl-peer").count() == 2
    # disable, see it change, enable again
    await panel.locator(f'.cl-peer[data-peer="{peers[0].name}"] button[data-act="toggle"]').click()
    await panel.locator(f'.cl-peer[data-peer="{peers[0].name}"].cl-disabled').wait_for(timeout=5000)
    await panel.locator(f'.cl-peer[data-peer="{peers[0].name}"] button[data-act="toggle"]').click()
    await panel.locator(f'.cl-peer[data-peer="{peers[0].name}"].cl-healthy').wait_for(timeout=5000)
    # the scheduler's choices, applied by the coordinator, then put back
    for act, value, default in (("strategy", "round_robin", "least_busy"), ("order", "longest_first", "fifo")):
        for chosen in (value, default):
            async with page.expect_response(lambda r: f"/lb/scheduler/{act}/{chosen}" in r.url) as answer:
                await panel.locator(f'select[data-act="{act}"]').select_option(chosen)
            assert (await (await answer.value).json())[act] == chosen
    # a bad form entry is refused inline, then a good one adds the peer
    form = panel.locator("form")
    await form.locator('input[name="name"]').fill("bad name!")
    await form.locator('input[name="host"]').fill("127.0.0.1")
    await form.locator('button[type="submit"]').click()
    assert "Name" in await form.locator(".cl-error").inner_text()
    await form.locator('input[name="name"]').fill(peers[2].name)
    await form.locator('input[name="port"]').fill(str(peers[2].port))
    await form.locator('input[name="max_queue"]').press("Enter")  # keyboard submit
    await panel.locator(f'.cl-peer[data-peer="{peers[2].name}"].cl-healthy').wait_for(timeout=30000)
    # a running prompt's progress
    async with Client(base_url) as c:
        run = (await c.queue(sleep_prompt(4.0, "panel")))[2]
        await panel.locator('.cl-progress[aria-valuenow]:not([aria-valuenow="0"])').first.wait_for(timeout=30000)
        if while_running is not None:
            await while_running()
        await asyncio.wait_for(run.done.wait(), 60)
        await panel.locator(".cl-progress").first.wait_for(state="detached", timeout=10000)


async def remove_peer(base_url: str, name: str) -> None:
    async with Client(base_url) as c:
        async with c.session.delete(f"{base_url}/lb/backends/{name}") as r:
            assert r.status in (200, 404)


async def test_sidebar_tab_in_the_coordinator_comfyui(browser, coordinators, peers, shots):
    coord = coordinators["coord"]
    page, errors = await open_page(browser, coord.url)
    try:
        tab = page.locator(".comfylb-tab-button")
        await tab.wait_for(timeout=90000)
        await tab.click()
        palette = "window.comfyAPI.app.app.extensionManager.setting.set('Comfy.ColorPalette', '{}')"

        async def capture():
            await page.screenshot(path=str(shots / "panel-comfyui-dark.png"))
            await page.evaluate(palette.format("light"))
            await page.screenshot(path=str(shots / "panel-comfyui-light.png"))
            await page.evaluate(palette.format("dark"))
        await exercise_panel(page, coord.url, peers, ".comfylb", capture)
        assert not [e for e in errors if "comfylb" in e.lower()], errors
    finally:
        await page.close()
        await remove_peer(coord.url, peers[2].name)


async def test_standalone_page(browser, balancer, peers, shots):
    page, errors = await open_page(browser, balancer.url + "/", width=460)
    try:
        async def capture():
            await page.screenshot(path=str(shots / "panel-standalone-dark.png"), full_page=True)
            await page.locator("#theme").click()  # the page's own switch
            await page.screenshot(path=str(shots / "panel-standalone-light.png"), full_page=True)
            await page.locator("#theme").click()
        await exercise_panel(page, balancer.url, peers, ".comfylb", capture)
        assert errors == []
    finally:
        await page.close()
        await remove_peer(balancer.url, peers[2].name)


async def test_the_coordinator_web_ui_runs_on_peers(browser, coordinators, peers, shots):
    """Run from the coordinator's own UI: the Save node shows the image a peer made, the
    queue panel lists the job, and the UI's interrupt button stops a running prompt."""
    coord = coordinators["coord"]
    page, errors = await open_page(browser, coord.url)
    load = "(wf) => window.comfyAPI.app.app.loadApiJson(wf, 'comfylb-webui')"
    run_button = page.locator("button.p-splitbutton-button").first
    try:
        await page.locator(".comfylb-tab-button").wait_for(timeout=90000)
        # the UI shows several running prompts at once: ComfyLB's extension asks for them interleaved
        assert await page.evaluate(
            "() => window.comfyAPI.api.api.getClientFeatureFlags().comfylb_interleave") is True
        workflow = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 4321}},
            "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": 1.0}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "webui"}},
        }
        await page.evaluate(load, workflow)
        async with page.expect_response(lambda r: "/api/view?" in r.url and "webui" in r.url and r.status == 200,
                                        timeout=60000) as shown:
            await run_button.click()
        url = (await shown.value).url
        assert any(f"subfolder={p.name}" in url for p in peers[:2]), url  # made on a peer, not here
        await page.locator(".queue-tab-button").click()
        await page.locator(".side-bar-panel img[src*='/api/view']").first.wait_for(timeout=30000)
        await page.screenshot(path=str(shots / "webui-queue-panel.png"))

        workflow["2"]["inputs"]["seconds"] = 30.0
        workflow["1"]["inputs"]["color"] = 1234
        await page.evaluate(load, workflow)
        async with Client(coord.url) as c:
            await run_button.click()
            snap = await c.wait_event("comfylb.status", lambda d: any(q["state"] == "running" for q in d["queue"]))
            running = next(q["task_id"] for q in snap["queue"] if q["state"] == "running")
            await page.locator('button[aria-label="Cancel current run"]').click()  # the UI's own button
            await c.wait_event("comfylb.status", lambda d: all(q["task_id"] != running for q in d["queue"]))
            _, hist = await c.get(f"/api/history/{running}")
            assert [m[0] for m in hist[running]["status"]["messages"]][-1] == "execution_interrupted"
        assert not [e for e in errors if "comfylb" in e.lower()], errors
    finally:
        await page.close()
