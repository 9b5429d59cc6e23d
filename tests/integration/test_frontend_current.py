"""Today's ComfyUI web UI (comfyui-frontend-package 1.58.1) on a coordinator, in real
headless Chromium: Run, the Job Queue, job history, Media Assets › Generated, opening a
finished job's workflow, cancelling from the Job Queue, and ComfyLB's own sidebar tab.

That frontend reads its queue and history only through /api/jobs (and cancels through
/api/jobs/{id}/cancel); the coordinator must answer those for the whole cluster.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request

import pytest


pytestmark = pytest.mark.real

FRONTEND = "1.58.1"

# Selectors of frontend 1.58.1, found by driving it (see the report of the change that added this file).
RUN = "[data-testid=queue-button]"
QUEUE_TOGGLE = "[data-testid=queue-overlay-toggle]"  # aria-pressed="true" when the job list is expanded
JOB_LIST = "[data-testid=job-assets-list]"  # the expanded Job Queue: running, pending and finished jobs
ASSETS_TAB = "[data-testid=assets-tab-button]"  # Media Assets sidebar tab
GENERATED = "#tabpanel-output"  # its "Generated" tab panel; cards are [data-asset-id=<prompt id>]
TEMPLATES = "[role=dialog][data-dialog-key=global-workflow-template-selector]"
COMFYLB_TAB = "[data-testid=comfylb-tab-button], .comfylb-tab-button"  # 1.58.1 dropped the class
VIEW_IMG = "img[src*='/api/view']"

# Recorded in the page from its first script on: error toasts (1.58.1's own toasts, or
# PrimeVue's in older frontends) vanish after a while, and job rows change state quickly.
WATCH = """
(() => {
  const seen = window.__comfylbSeen = {toasts: [], jobs: {}};
  const scan = () => {
    for (const t of document.querySelectorAll(
        "[data-testid=toast][data-toast-kind=error], .p-toast-message-error")) {
      const text = (t.innerText || "").trim();
      if (!seen.toasts.includes(text)) seen.toasts.push(text);
    }
    for (const row of document.querySelectorAll("[data-testid=job-assets-list] [data-job-id]")) {
      let state;
      if (row.querySelector("img[src*='/api/view']")) state = "done";
      else if (row.querySelector("[class*='lucide--zap']")) state = "running";
      else state = ((row.querySelector("span[title]") || row).innerText || "").trim();
      const states = seen.jobs[row.dataset.jobId] = seen.jobs[row.dataset.jobId] || [];
      if (!states.includes(state)) states.push(state);
    }
  };
  new MutationObserver(scan).observe(document, {subtree: true, childList: true, characterData: true});
})();
"""




class Ui:
    """One page of the coordinator's web UI, with what it logged."""

    def __init__(self, page) -> None:
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    async def wait(self, locator, timeout: float, state: str = "visible") -> None:
        """locator.wait_for, and on a timeout say what the frontend logged about /api/jobs."""
        try:
            await locator.wait_for(state=state, timeout=timeout)
        except Exception as e:
            if type(e).__name__ != "TimeoutError":
                raise
            logged = [m.splitlines()[0] for m in self.console if "[Jobs API]" in m or "JobsApiError" in m]
            raise AssertionError(f"{e}\nthe frontend logged about /api/jobs: {logged[-3:] or 'nothing'}") from e

    async def seen(self) -> dict:
        return await self.page.evaluate("window.__comfylbSeen")

    async def assert_clean(self) -> None:
        """No failed jobs-API call logged, no error toast, no uncaught page error."""
        jobs_api = [m for m in self.console if "[Jobs API]" in m or "JobsApiError" in m]
        assert not jobs_api, jobs_api
        assert (await self.seen())["toasts"] == []
        assert self.errors == []

    async def load(self, workflow: dict, name: str) -> None:
        await self.page.evaluate("([wf, name]) => window.app.loadApiJson(wf, name)", [workflow, name])

    async def set_color(self, color: int) -> None:
        """A different input each run: an identical prompt is served from a peer's cache."""
        await self.page.evaluate(
            "(c) => { window.app.graph.nodes.find(n => n.type === 'EmptyImage')"
            ".widgets.find(w => w.name === 'color').value = c; }", color)

    async def run(self) -> str:
        """Press Run; the prompt id the coordinator gave it."""
        async with self.page.expect_response(
                lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
            await self.page.locator(RUN).click()
        response = await answer.value
        assert response.status == 200, await response.text()
        return (await response.json())["prompt_id"]

    async def job_queue(self):
        """The Job Queue expanded to its list (the toggle otherwise shows a summary)."""
        toggle = self.page.locator(QUEUE_TOGGLE)
        if await toggle.get_attribute("aria-pressed") != "true":
            await toggle.click()
        jobs = self.page.locator(JOB_LIST)
        await jobs.wait_for(timeout=10000)
        return jobs

    async def job_menu(self, row):
        """A job row's "More" menu (its buttons show on hover)."""
        await row.hover()
        await row.get_by_role("button", name="More").click()
        menu = self.page.get_by_role("menu").last
        await menu.wait_for(timeout=5000)
        return menu


async def open_ui(browser, coord) -> Ui:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.add_init_script(WATCH)
    ui = Ui(page)
    await page.goto(coord.url)
    await page.locator(RUN).wait_for(timeout=90000)
    await page.wait_for_function("() => window.app && window.app.graph && window.comfyAPI.app.app === window.app")
    await assert_frontend_current(page)
    await dismiss_templates(page)
    return ui


async def assert_frontend_current(page) -> None:
    """The page runs frontend 1.58.1, not the 1.32.9 that 0.3.75 ships with."""
    version = await page.evaluate("window.__COMFYUI_FRONTEND_VERSION__")
    assert version == FRONTEND, f"the coordinator serves frontend {version}, not {FRONTEND}"


async def dismiss_templates(page) -> None:
    """The Templates dialog a first start opens (coordinator() marks the tutorial done, so
    it should not come; if it does, Escape closes it as its close button would)."""
    dialog = page.locator(TEMPLATES)
    if await dialog.is_visible():
        await page.keyboard.press("Escape")
        await dialog.wait_for(state="detached", timeout=10000)


def sleep_workflow(seconds: float, color: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fe158"}},
    }


def _history(peer, prompt_id: str) -> dict | None:
    with urllib.request.urlopen(f"{peer.url}/history/{prompt_id}", timeout=5) as r:
        return json.load(r).get(prompt_id)


async def peer_history(peers, prompt_id: str, timeout: float) -> tuple[str, dict]:
    """The peer that ran prompt_id and its history entry, once it has one (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        for p in peers:
            entry = await asyncio.to_thread(_history, p, prompt_id)
            if entry is not None:
                return p.name, entry
        if time.monotonic() > deadline:
            raise AssertionError(f"{prompt_id} is in no peer's /history after {timeout}s")
        await asyncio.sleep(0.2)


def messages(entry: dict) -> list[str]:
    return [m[0] for m in entry["status"]["messages"]]


INTERLEAVE_FLAG = "() => window.comfyAPI.api.api.getClientFeatureFlags().comfylb_interleave"


async def test_the_comfylb_tab_in_frontend_1_58(browser, coordinator_current, peers, shots):
    ui = await open_ui(browser, coordinator_current)
    page = ui.page
    try:
        await page.locator(COMFYLB_TAB).first.click()
        panel = page.locator(".comfylb")
        for p in peers[:2]:
            await panel.locator(f'.cl-peer[data-peer="{p.name}"].cl-healthy').wait_for(timeout=30000)
        assert await panel.locator(".cl-peer").count() == 2
        await page.screenshot(path=str(shots / "fe158-comfylb-tab.png"))
        # the UI shows several running jobs at once: ComfyLB's extension asks for them interleaved
        assert await page.evaluate(INTERLEAVE_FLAG) is True
        assert not [e for e in ui.errors if "comfylb" in e.lower()], ui.errors
    finally:
        await page.close()


async def test_run_three_times_then_queue_history_assets_and_open_workflow(browser, coordinator_current, peers, shots):
    ui = await open_ui(browser, coordinator_current)
    page = ui.page
    try:
        await ui.load(sleep_workflow(1.5, 0), "fe158")
        jobs = await ui.job_queue()  # open first: it lists the jobs as they come
        ids = []
        for _ in range(3):
            await ui.set_color(random.randrange(1 << 24))
            ids.append(await ui.run())

        # finished, each with its image, in the Job Queue's history
        for pid in ids:
            await ui.wait(jobs.locator(f"[data-job-id='{pid}'] {VIEW_IMG}"), 60000)
        await page.screenshot(path=str(shots / "fe158-job-queue.png"))
        seen = (await ui.seen())["jobs"]
        for pid in ids:  # listed while still running or pending, before its image came
            assert {"running", "Job queued"} & set(seen.get(pid, [])), (pid, seen.get(pid))

        # made on the peers, both of them, each exactly once
        ran_on = {}
        for pid in ids:
            ran_on[pid], entry = await peer_history(peers[:2], pid, 30)
            assert entry["status"]["status_str"] == "success", entry["status"]
            assert entry["outputs"]["3"]["images"], entry["outputs"]
        assert set(ran_on.values()) == {peers[0].name, peers[1].name}, ran_on

        # Media Assets › Generated: the same three jobs, with their images
        await page.locator(ASSETS_TAB).click()
        await page.get_by_role("tab", name="Generated").click()
        generated = page.locator(GENERATED)
        for pid in ids:
            await ui.wait(generated.locator(f"[data-asset-id='{pid}'] {VIEW_IMG}"), 30000)
        await page.screenshot(path=str(shots / "fe158-generated.png"))

        # a finished job's workflow opens, from GET /api/jobs/{id}, as the graph that ran
        await page.evaluate("window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
        await page.wait_for_function("() => window.app.graph.nodes.length === 0")
        menu = await ui.job_menu((await ui.job_queue()).locator(f"[data-job-id='{ids[0]}']"))
        async with page.expect_response(lambda r: r.url.endswith(f"/api/jobs/{ids[0]}")) as detail:
            await menu.get_by_role("menuitem", name="Open as workflow in new tab").click()
        assert (await detail.value).status == 200
        await page.wait_for_function("() => window.app.graph.nodes.length === 3")
        types = await page.evaluate("window.app.graph.nodes.map(n => n.type).sort()")
        assert types == ["EmptyImage", "SaveImage", "TestSleep"], types
        tab = await page.evaluate("window.app.extensionManager.workflow.activeWorkflow.filename")
        assert ids[0] in tab, tab
        await page.screenshot(path=str(shots / "fe158-open-workflow.png"))
        await ui.assert_clean()
    finally:
        await page.close()


async def test_cancel_from_the_job_queue(browser, coordinator_current, peers, shots):
    """Two long jobs, one on each peer: one cancelled with its row's Cancel button, the
    other from its row's menu; both end on their peer as interrupted."""
    ui = await open_ui(browser, coordinator_current)
    page = ui.page
    try:
        await ui.load(sleep_workflow(30.0, 0), "fe158-long")
        jobs = await ui.job_queue()
        ids = []
        for _ in range(2):
            await ui.set_color(random.randrange(1 << 24))
            ids.append(await ui.run())
        rows = [jobs.locator(f"[data-job-id='{pid}']") for pid in ids]
        for row in rows:  # running on a peer (max_queue 1 each: one per peer)
            await ui.wait(row.locator("[class*='lucide--zap']"), 30000)
        await page.screenshot(path=str(shots / "fe158-running.png"))

        async with page.expect_response(lambda r: r.url.endswith(f"/api/jobs/{ids[0]}/cancel")) as answer:
            await rows[0].hover()
            await rows[0].get_by_role("button", name="Cancel").click()
        assert (await answer.value).status == 200
        assert (await (await answer.value).json()) == {"cancelled": True}

        menu = await ui.job_menu(rows[1])
        async with page.expect_response(lambda r: r.url.endswith(f"/api/jobs/{ids[1]}/cancel")) as answer:
            await menu.get_by_role("menuitem", name="Cancel job").click()
        assert (await answer.value).status == 200
        assert (await (await answer.value).json()) == {"cancelled": True}

        ran_on = {}
        for pid in ids:
            ran_on[pid], entry = await peer_history(peers[:2], pid, 20)
            assert messages(entry)[-1] == "execution_interrupted", messages(entry)
        assert set(ran_on.values()) == {peers[0].name, peers[1].name}, ran_on
        for row in rows:  # no longer running in the UI either
            await ui.wait(row.locator("[class*='lucide--zap']"), 15000, state="detached")
        await page.screenshot(path=str(shots / "fe158-cancelled.png"))
        await ui.assert_clean()
    finally:
        await page.close()


def lb_post(coord, path: str) -> int:
    """POST an empty body to the coordinator's /lb/* `path` (blocking: run it in a thread)."""
    req = urllib.request.Request(f"{coord.url}{path}", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


async def test_a_prompt_that_waits_for_no_peer_is_shown_as_waiting(browser, coordinator_current, peers, shots):
    """Run with every peer disabled: the web UI says the prompt waits, and why; it runs
    once a peer is back."""
    ui = await open_ui(browser, coordinator_current)
    page = ui.page
    names = [p.name for p in peers[:2]]
    try:
        for name in names:
            assert await asyncio.to_thread(lb_post, coordinator_current, f"/lb/backends/{name}/disable") == 200
        await ui.load(sleep_workflow(0.1, random.randrange(1 << 24)), "fe158-waiting")
        pid = await ui.run()
        toast = page.get_by_text("ComfyLB: prompt waiting")
        await ui.wait(toast.first, 20000)
        assert "no peer is available" in await page.get_by_text("no peer is available").first.inner_text()
        await page.screenshot(path=str(shots / "fe158-waiting.png"))
    finally:
        for name in names:
            await asyncio.to_thread(lb_post, coordinator_current, f"/lb/backends/{name}/enable")
    try:
        await peer_history(peers[:2], pid, 60)
        assert not [e for e in ui.errors if "comfylb" in e.lower()], ui.errors
    finally:
        await page.close()
