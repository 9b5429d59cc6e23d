"""The panel in real headless Chromium: in a real coordinator ComfyUI's frontend and on
the standalone page, each with two real peers."""
from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiohttp
import pytest

from tests import procs
from tests.client import Client, sleep_prompt
from tests.conftest import COORD_TOKEN, peer_backend
from tests.integration.test_frontend_current import lb_post, peer_history

pytestmark = pytest.mark.real



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
    # with every peer disabled a prompt waits, and the panel says why until one takes it
    toggles = [panel.locator(f'.cl-peer[data-peer="{p.name}"] button[data-act="toggle"]') for p in peers[:2]]
    for toggle, p in zip(toggles, peers[:2]):
        await toggle.click()
        await panel.locator(f'.cl-peer[data-peer="{p.name}"].cl-disabled').wait_for(timeout=5000)
    async with Client(base_url) as c:
        waiting = (await c.queue(sleep_prompt(0.1, "waiting")))[2]
        await panel.locator(".cl-waiting", has_text="is disabled").wait_for(timeout=10000)
        for toggle, p in zip(toggles, peers[:2]):
            await toggle.click()
            await panel.locator(f'.cl-peer[data-peer="{p.name}"].cl-healthy').wait_for(timeout=5000)
        await asyncio.wait_for(waiting.done.wait(), 60)
    await panel.locator(".cl-waiting").wait_for(state="detached", timeout=10000)
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


# -- access (issue 12: items 4, 5 and 21) ---------------------------------------------------
SVG_XSS = (b'<svg xmlns="http://www.w3.org/2000/svg"><script>document.title = "ran";'
           b'fetch("/lb/scheduler/strategy/round_robin", {method: "POST"});'
           b'fetch("/api/lb/scheduler/strategy/round_robin", {method: "POST"})</script></svg>')


async def upload_svg(base_url: str) -> str:
    name = f"xss-{uuid.uuid4().hex[:8]}.svg"
    async with aiohttp.ClientSession() as s:
        form = aiohttp.FormData()
        form.add_field("image", SVG_XSS, filename=name)
        async with s.post(base_url + "/api/upload/image", data=form) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["name"]


async def assert_downloaded_not_run(context, url: str) -> None:
    """Opened in a tab, the file is saved, never shown: its script does not run here."""
    page = await context.new_page()
    try:
        async with page.expect_download() as download:
            with contextlib.suppress(Exception):  # "Download is starting" aborts the navigation
                await page.goto(url)
        assert (await download.value).suggested_filename.endswith(".svg")
        assert await page.title() != "ran"
    finally:
        await page.close()


async def assert_token_nowhere_a_script_reads(page, token: str) -> None:
    readable = await page.evaluate("""async () => JSON.stringify([{...localStorage}, {...sessionStorage},
        document.cookie, await (await fetch('/api/settings')).text()])""")
    assert token not in readable
    cookies = [c for c in await page.context.cookies() if c["name"] == "comfylb_session"]
    assert cookies and all(c["httpOnly"] and c["sameSite"] == "Strict" and token not in c["value"] for c in cookies)


async def test_panel_token_is_an_httponly_cookie_and_status_reaches_only_it(browser, coordinators, peers):
    """The extension: the token asked once buys an HttpOnly cookie (not a ComfyUI setting),
    the panel's socket alone receives the pushes, and an uploaded SVG opened in a tab is
    a download whose script never runs."""
    coord = coordinators["coord_auth"]
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        await page.goto(coord.url)
        await page.locator(".comfylb-tab-button").click(timeout=90000)
        prompt = page.locator(".prompt-dialog-content input")
        await prompt.fill(COORD_TOKEN, timeout=10000)
        await prompt.press("Enter")
        panel = page.locator(".comfylb")
        await panel.locator(f'.cl-peer[data-peer="{peers[2].name}"].cl-healthy').wait_for(timeout=30000)
        await assert_token_nowhere_a_script_reads(page, COORD_TOKEN)
        paths = {c["path"] for c in await context.cookies() if c["name"] == "comfylb_session"}
        assert paths == {"/lb", "/api/lb"}
        auth = {"Authorization": f"Bearer {COORD_TOKEN}"}
        async with Client(coord.url) as stranger, aiohttp.ClientSession(headers=auth) as admin:
            for act, shown in (("disable", "cl-disabled"), ("enable", "cl-healthy")):  # pushed, not polled
                async with admin.post(f"{coord.url}/lb/backends/{peers[2].name}/{act}") as r:
                    assert r.status == 200
                await panel.locator(f'.cl-peer[data-peer="{peers[2].name}"].{shown}').wait_for(timeout=5000)
            await asyncio.sleep(0.3)
            assert not [t for t, _ in stranger.other if t == "comfylb.status"]
            await assert_downloaded_not_run(context, f"{coord.url}/api/view?filename={await upload_svg(coord.url)}"
                                                     "&type=input")
            async with admin.get(f"{coord.url}/lb/scheduler") as r:
                assert (await r.json())["strategy"] == "least_busy"
        await page.reload()  # the session outlives the page; the token is not asked again
        await page.locator(".comfylb-tab-button").click(timeout=90000)
        await panel.locator(f'.cl-peer[data-peer="{peers[2].name}"]').wait_for(timeout=30000)
        await panel.locator('button[data-act="logout"]').click()
        await panel.locator('button[data-act="login"]').wait_for(timeout=5000)
        assert not [c for c in await context.cookies() if c["name"] == "comfylb_session"]
        assert not [e for e in errors if "comfylb" in e.lower()], errors
    finally:
        await context.close()


async def test_standalone_page_logs_in_with_a_cookie(browser, workdir, peers):
    """The standalone page with api_token guarding everything: the token asked once opens
    /lb/* and the page's own /ws (cookie paths), and is kept in no storage a script reads."""
    token = "standalone-s3cret"
    with procs.running_balancer(workdir, "lb_auth", [peer_backend(peers[2], max_queue=1)],
                                auth={"api_token": token}) as lb:
        context = await browser.new_context(viewport={"width": 460, "height": 900}, accept_downloads=True)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept(token)))
        try:
            await page.goto(lb.url + "/")
            panel = page.locator(".comfylb")
            await panel.locator(f'.cl-peer[data-peer="{peers[2].name}"].cl-healthy').wait_for(timeout=30000)
            await assert_token_nowhere_a_script_reads(page, token)
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as admin:
                async with admin.post(f"{lb.url}/lb/backends/{peers[2].name}/disable") as r:
                    assert r.status == 200
                # pushed over the page's /ws, which the cookie opened
                await panel.locator(f'.cl-peer[data-peer="{peers[2].name}"].cl-disabled').wait_for(timeout=10000)
                form = aiohttp.FormData()
                form.add_field("image", SVG_XSS, filename="xss.svg")
                async with admin.post(lb.url + "/upload/image", data=form) as r:
                    name = (await r.json())["name"]
            await assert_downloaded_not_run(context, f"{lb.url}/view?filename={name}&type=input&token={token}")
            assert errors == []
        finally:
            await context.close()


async def test_the_tab_says_why_comfylb_is_not_attached(browser, coordinators):
    stock = coordinators["stock"]  # ComfyLB installed, no config
    page, errors = await open_page(browser, stock.url)
    try:
        await page.locator(".comfylb-tab-button").click(timeout=90000)
        banner = page.locator(".comfylb .cl-detached")
        await banner.wait_for(timeout=10000)
        text = await page.locator(".comfylb").inner_text()
        assert "not attached" in text and "no config at" in text and "stock-absent.yaml" in text
        assert "HTTP 404" not in text
        assert await page.locator(".comfylb .cl-form").is_hidden()  # no add-peer form that cannot work
        assert not [e for e in errors if "comfylb" in e.lower()], errors
    finally:
        await page.close()


async def test_a_prompt_that_waits_for_no_peer_is_shown_as_waiting_in_frontend_1_32(browser, coordinators, peers):
    """The web UI ComfyUI 0.3.75 ships (1.32) shows the waiting notice as 1.58 does."""
    coord = coordinators["coord"]
    page, errors = await open_page(browser, coord.url)
    names = [p.name for p in peers[:2]]
    try:
        await page.locator(".comfylb-tab-button").wait_for(timeout=90000)
        for name in names:
            assert await asyncio.to_thread(lb_post, coord, f"/lb/backends/{name}/disable") == 200
        workflow = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 2468}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "waiting132"}},
        }
        await page.evaluate("(wf) => window.comfyAPI.app.app.loadApiJson(wf, 'comfylb-waiting')", workflow)
        async with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as queued:
            await page.locator("button.p-splitbutton-button").first.click()
        pid = (await (await queued.value).json())["prompt_id"]
        await page.get_by_text("ComfyLB: prompt waiting").first.wait_for(timeout=20000)
        assert await page.get_by_text("no peer is available").count() >= 1
    finally:
        for name in names:
            await asyncio.to_thread(lb_post, coord, f"/lb/backends/{name}/enable")
    try:
        async with Client(coord.url) as c:  # the waiting prompt runs once the peers are back
            await c.until(lambda: c.status and c.status[-1]["status"]["exec_info"]["queue_remaining"] == 0, 60)
        await peer_history(peers[:2], pid, 60)  # it ran on a peer, not only left the queue
        assert not [e for e in errors if "comfylb" in e.lower()], errors
    finally:
        await page.close()
