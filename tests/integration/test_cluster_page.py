"""The cluster at a glance (issue 15, item 5) in real headless Chromium: the standalone page
at full width shows a table of the peers (state, a local worker's restarts, what each
lacks, copies in progress) and a timeline drawn from the comfylb.status pushes (one lane
per peer with its jobs as bars, the queue's depth over time).  The real standalone balancer
in this process over simulated peers (and, for a real copy, a peer running ComfyLB's
agent), so each test takes seconds."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from comfylb_ext.agent import Agent
from comfylb_ext.config import BackendConfig
from tests.client import Client, sleep_prompt
from tests.fakeworkers import lb_over_fake_workers
from tests.integration.test_panel import open_page
from tests.peers import hostile_peer
from tests.simcluster import lb_over_sims, wait_for

pytestmark = pytest.mark.real

WIDE = 1400  # the page's two columns: the panel, and the cluster beside it

ROWS = "() => [...document.querySelectorAll('#cluster tr[data-peer]')].map((r) => [r.dataset.peer, " \
       "r.querySelector('.cc-status').textContent])"

# a job's bar and the lane it is drawn in: its group's peer, and whether it lies inside that
# peer's lane (the row of the timeline that carries the peer's name)
BAR = """(task) => {
  const bar = document.querySelector(`#cluster .cc-job[data-task="${task}"]`);
  if (!bar) return null;
  const group = bar.closest('.cc-jobs').dataset.peer;
  const lane = document.querySelector(`#cluster .cc-lane[data-peer="${group}"] .cc-lane-bg`);
  const b = bar.getBBox(), l = lane.getBBox();
  return {peer: bar.dataset.peer, group, state: bar.dataset.state, width: b.width,
          inLane: b.y >= l.y && b.y + b.height <= l.y + l.height,
          count: document.querySelectorAll(`#cluster .cc-job[data-task="${task}"]`).length};
}"""

TICKS = "() => Number(document.querySelector('#cluster .cc-timeline').dataset.ticks || 0)"


async def post(url: str, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path) as r:
            assert r.status in (200, 202), await r.text()


async def wide_page(browser, url: str, span: str | None = None):
    page, errors = await open_page(browser, url + "/", width=WIDE)
    await page.locator("#cluster .cc-timeline svg").wait_for(timeout=15000)
    if span:
        await page.locator("#cluster .cc-span").select_option(span)
    return page, errors


async def bbox(page, selector: str) -> dict:
    """An SVG shape's geometry in the drawing's own units (without its stroke), found and
    measured at once (the timeline is redrawn as time passes)."""
    return await page.evaluate("(sel) => { const b = document.querySelector(sel).getBBox(); "
                               "return {y: b.y, height: b.height}; }", selector)


async def next_ticks(page, n: int = 2) -> None:
    """Until the timeline has been drawn `n` more times (it is redrawn as time passes)."""
    start = await page.evaluate(TICKS)
    await page.wait_for_function(f"() => ({TICKS})() >= {start + n}", timeout=10000)


async def test_the_table_has_a_row_per_peer_with_its_state_and_what_it_lacks(browser):
    sim_kw = [{"checkpoints": ["a.safetensors", "b.safetensors"]}, {"checkpoints": ["a.safetensors"]},
              {"checkpoints": ["a.safetensors", "b.safetensors"]}]
    async with lb_over_sims(3, sim_kw=sim_kw) as (url, sims, cluster):
        await wait_for(lambda: all(p.object_info for p in cluster.peers.values()), cluster)
        page, errors = await wide_page(browser, url)
        try:
            names = list(cluster.peers)
            await page.wait_for_function(f"() => ({ROWS})().length === {len(names)}", timeout=15000)
            assert await page.evaluate(ROWS) == [[n, "healthy"] for n in names]
            # wide: the table sits beside the panel, not under it
            panel, table = [await page.locator(sel).bounding_box() for sel in ("#panel", "#cluster table")]
            assert table["x"] >= panel["x"] + panel["width"] and table["y"] < panel["y"] + panel["height"]
            # what each lacks, from the inventory the panel reads
            lacks = page.locator('#cluster tr[data-peer="sim1"] .cc-lacks')
            await lacks.wait_for(timeout=15000)
            assert "b.safetensors" in await lacks.inner_text()
            assert "checkpoints: b.safetensors" in await lacks.get_attribute("title")
            for other in ("sim0", "sim2"):
                assert await page.locator(f'#cluster tr[data-peer="{other}"] .cc-lacks').count() == 0
                assert await page.locator(f'#cluster tr[data-peer="{other}"] .cc-lacks-cell').inner_text() == "nothing"
            # restarts are a local worker's; these peers are not
            assert await page.locator('#cluster tr[data-peer="sim0"] .cc-restarts').inner_text() == "–"
            # pushed changes: a disabled peer, then a removed one
            await post(url, "/lb/backends/sim2/disable")
            await page.wait_for_function(f"() => JSON.stringify(({ROWS})()) === "
                                         """'[["sim0","healthy"],["sim1","healthy"],["sim2","disabled"]]'""",
                                         timeout=10000)
            async with aiohttp.ClientSession() as s:
                async with s.delete(url + "/lb/backends/sim2") as r:
                    assert r.status == 200
            await page.wait_for_function(f"() => ({ROWS})().length === 2", timeout=10000)
            assert [r[0] for r in await page.evaluate(ROWS)] == ["sim0", "sim1"]
            assert errors == []
        finally:
            await page.close()


async def test_a_running_prompt_is_a_bar_in_its_peers_lane_until_it_ends(browser):
    async with lb_over_sims(2) as (url, sims, cluster):
        page, errors = await wide_page(browser, url, span="1")
        try:
            lanes = await page.evaluate("() => [...document.querySelectorAll('#cluster .cc-lane')].map((g) => g.dataset.peer)")
            assert lanes == ["sim0", "sim1"]
            assert await page.locator("#cluster .cc-job").count() == 0
            async with Client(url) as c:
                status, body, run = await c.queue(sleep_prompt(5.0, "bar"))
                assert status == 200, body
                pid = body["prompt_id"]
                await page.wait_for_function(f"() => ({BAR})('{pid}')?.state === 'running'", timeout=15000)
                peer = cluster.tasks[pid].peer  # where the coordinator runs it
                bar = await page.evaluate(BAR, pid)
                assert bar["peer"] == bar["group"] == peer and bar["inLane"] and bar["count"] == 1
                row = page.locator(f'#cluster tr[data-peer="{peer}"] .cc-running')
                assert pid[:8] in await row.inner_text()
                # a running bar grows with the time it has been running
                await page.wait_for_function(
                    f"() => {{ const b = ({BAR})('{pid}'); return b.state === 'running' && b.width > {bar['width']}; }}",
                    timeout=15000)
                await asyncio.wait_for(run.done.wait(), 60)
            # it ends with the prompt: no longer running, and no longer growing
            await page.wait_for_function(f"() => ({BAR})('{pid}').state === 'done'", timeout=10000)
            ended = await page.evaluate(BAR, pid)
            await next_ticks(page)
            again = await page.evaluate(BAR, pid)
            assert again["width"] == ended["width"] and again["group"] == peer and again["inLane"]
            assert "idle" in await row.inner_text()
            assert errors == []
        finally:
            await page.close()


async def test_the_queue_chart_shows_prompts_waiting(browser):
    async with lb_over_sims(2) as (url, sims, cluster):
        page, errors = await wide_page(browser, url)
        try:
            depth = page.locator("#cluster .cc-depth")
            area = page.locator("#cluster .cc-depth-area")
            await area.wait_for(state="attached", timeout=10000)
            assert (await depth.get_attribute("data-peak"), await depth.get_attribute("data-now")) == ("0", "0")
            assert (await bbox(page, "#cluster .cc-depth-area"))["height"] == 0  # flat on the baseline
            for name in ("sim0", "sim1"):  # no peer takes work: prompts wait in the coordinator
                await post(url, f"/lb/backends/{name}/disable")
            async with Client(url) as c:
                runs = [(await c.queue(sleep_prompt(0.2, "depth")))[2] for _ in range(3)]
                await page.wait_for_function(
                    "() => document.querySelector('#cluster .cc-depth')?.dataset.now === '3'", timeout=10000)
                assert await depth.get_attribute("data-peak") == "3"
                assert "3 waiting" in await depth.text_content()
                # the area rises to the top of the chart: 3 is the most shown
                box, chart = await bbox(page, "#cluster .cc-depth-area"), await bbox(page, "#cluster .cc-depth-bg")
                assert box["y"] == chart["y"] and box["height"] == chart["height"]
                for name in ("sim0", "sim1"):
                    await post(url, f"/lb/backends/{name}/enable")
                for run in runs:
                    await asyncio.wait_for(run.done.wait(), 60)
            await page.wait_for_function(
                "() => document.querySelector('#cluster .cc-depth')?.dataset.now === '0'", timeout=10000)
            assert await depth.get_attribute("data-peak") == "3"  # what was, stays in the chart
            assert "0 waiting" in await depth.text_content()
            assert errors == []
        finally:
            await page.close()


def transfer(id: str, peer: str, state: str, done: int, total: int | None) -> dict:
    return {"id": id, "peer": peer, "folder": "checkpoints", "name": f"{id}.safetensors", "source": "sim9",
            "done": done, "total": total, "state": state, "error": "disk full" if state == "failed" else None}


COPIES = """() => Object.fromEntries([...document.querySelectorAll('#cluster tr[data-peer]')].map((r) =>
  [r.dataset.peer, [...r.querySelectorAll('.cc-copy')].map((c) => [c.dataset.transfer, c.dataset.state,
    c.querySelector('.cc-pct').textContent.trim(), c.querySelector('[role=progressbar]').getAttribute('aria-valuenow')])]))"""


async def test_copies_in_progress_are_shown_per_peer(browser):
    """The pushes' `transfers` (copies of model files to a peer): those not finished, on
    their peer's row, with how far each is; none for a push without the list (an older
    ComfyLB).  Every state at once is put into the balancer's real pushes by the test; the
    next test makes a real copy."""
    async with lb_over_sims(2) as (url, sims, cluster):
        plain = cluster.snapshot
        copies: dict = {"transfers": []}

        def snapshot() -> dict:
            snap = {k: v for k, v in plain().items() if k != "transfers"}
            return {**snap, **copies}
        cluster.snapshot = cluster.notify.snapshot = snapshot  # GET /lb/status and the pushes
        page, errors = await wide_page(browser, url)
        try:
            await page.wait_for_function(f"() => ({ROWS})().length === 2", timeout=15000)
            assert await page.evaluate(COPIES) == {"sim0": [], "sim1": []}

            async def push(transfers: list | None, expected: dict) -> None:
                copies.clear()
                if transfers is not None:
                    copies["transfers"] = transfers
                cluster.changed()
                await page.wait_for_function(f"(expected) => JSON.stringify(({COPIES})()) === expected",
                                             arg=json.dumps(expected, separators=(",", ":")), timeout=10000)

            await push([transfer("c1", "sim0", "copying", 50, 200), transfer("c2", "sim0", "queued", 0, None),
                        transfer("c3", "sim1", "preparing", 999, 1000), transfer("c4", "sim1", "done", 1000, 1000),
                        transfer("c5", "sim0", "failed", 10, 1000), transfer("c6", "gone", "copying", 1, 2)],
                       {"sim0": [["c1", "copying", "25%", "25"], ["c2", "queued", "", "0"]],
                        "sim1": [["c3", "preparing", "99%", "99"]]})
            text = await page.locator('#cluster tr[data-peer="sim0"] .cc-copies').inner_text()
            assert "checkpoints/c1.safetensors" in text and "c5" not in text
            await push([transfer("c1", "sim0", "copying", 150, 200), transfer("c2", "sim0", "done", 7, 7),
                        transfer("c3", "sim1", "copying", 1000, 1000)],
                       {"sim0": [["c1", "copying", "75%", "75"]], "sim1": [["c3", "copying", "100%", "100"]]})
            await push(None, {"sim0": [], "sim1": []})  # a push without the list: no copies
            assert await page.locator("#cluster .cc-copies").all_inner_texts() == ["–", "–"]
            assert errors == []
        finally:
            await page.close()


async def until(cond, timeout: float = 15.0) -> None:
    """Until `cond()` holds (checked every 20 ms), for state that announces no change."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "not within the deadline"
        await asyncio.sleep(0.02)


SECRET = "cluster-page-agent-secret"


async def test_a_real_copy_shows_on_its_peers_row_until_it_is_done(browser, tmp_path):
    """A copy the balancer makes (POST /lb/backends/{name}/models from a URL) into a peer
    that runs ComfyLB's agent: on that peer's row with how far it is while it runs, gone once
    the file is in place.  The source sends half the file, then the rest when the test says."""
    size = 3 << 20
    release = asyncio.Event()

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(size)})
        await response.prepare(request)
        await response.write(b"\x01" * (size // 2))
        await release.wait()
        await response.write(b"\x01" * (size - size // 2))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/big.safetensors", download)
    source = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await source.setup()
    await web.TCPSite(source, "127.0.0.1", 0).start()
    models = tmp_path / "checkpoints"
    models.mkdir()
    agent = Agent(SECRET, folders=lambda: {"checkpoints": ([str(models)], {".safetensors"})})
    try:
        async with hostile_peer({(m, path): agent.guarded(h) for m, path, h in agent.routes()}) as (port, _), \
                lb_over_sims(1, auth={"agent_secret": SECRET}) as (url, sims, cluster):
            cluster.add_peer(BackendConfig(name="store", port=port))
            await until(lambda: cluster.peers["store"].agent)  # found when its link came up
            page, errors = await wide_page(browser, url)
            try:
                await page.wait_for_function(f"() => ({ROWS})().length === 2", timeout=15000)
                async with aiohttp.ClientSession() as s:
                    async with s.post(f"{url}/lb/backends/store/models", json={
                            "folder": "checkpoints", "name": "big.safetensors",
                            "from": f"http://127.0.0.1:{source.addresses[0][1]}/big.safetensors"}) as r:
                        assert r.status == 202, await r.text()
                        copy_id = (await r.json())["id"]
                copy = next(t for t in cluster.transfers.list if t.id == copy_id)
                await until(lambda: copy.done == size // 2)
                cluster.changed()  # copies tell their progress every half second: this one now
                await page.wait_for_function(f"(expected) => JSON.stringify(({COPIES})()) === expected",
                                             arg=json.dumps({"sim0": [], "store": [[copy_id, "copying", "50%", "50"]]},
                                                            separators=(",", ":")), timeout=10000)
                assert "checkpoints/big.safetensors" in await page.locator(
                    '#cluster tr[data-peer="store"] .cc-copies').inner_text()
                release.set()
                await page.wait_for_function(f"() => JSON.stringify(({COPIES})()) === '{{\"sim0\":[],\"store\":[]}}'",
                                             timeout=15000)
                assert copy.state == "done" and (models / "big.safetensors").stat().st_size == size
                assert errors == []
            finally:
                await page.close()
    finally:
        release.set()
        await source.cleanup()


async def test_a_local_workers_restarts_are_in_its_row(browser, tmp_path):
    async with lb_over_fake_workers(tmp_path) as (url, cluster):
        page, errors = await wide_page(browser, url)
        row = page.locator('#cluster tr[data-peer="worker-0"]')
        try:
            await row.locator(".cc-worker-state", has_text="running").wait_for(timeout=15000)
            assert await row.locator(".cc-restarts").inner_text() == "0"
            await post(url, "/lb/backends/worker-0/restart")
            await page.wait_for_function(
                """() => document.querySelector('#cluster tr[data-peer="worker-0"] .cc-restarts')?.textContent === '1'""",
                timeout=30000)
            assert errors == []
        finally:
            await page.close()
