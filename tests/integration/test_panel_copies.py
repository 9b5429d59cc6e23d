"""Copying a model file to a peer from the panel, with its progress (issue 15, item 3), in
real headless Chromium on the standalone page at the sidebar's width: the "missing" list
offers a copy button for a file another peer can send, the peer's card shows the copy
while it runs and its error if it failed, and a copy the coordinator refuses is an error
toast.  The real standalone balancer in this process over two peers that run ComfyLB's
real agent (a minimal ComfyUI whose /object_info and /models list the files in its model
folder) and a simulated peer without one."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp import web

from comfylb_ext import agent as agent_module
from comfylb_ext.agent import Agent
from comfylb_ext.config import BackendConfig
from comfylb_ext.sim import catalog as sim_catalog, start_sim
from tests.integration.test_cluster_page import until
from tests.integration.test_panel import open_page
from tests.peers import answer, hostile_peer
from tests.simcluster import start_balancer

pytestmark = pytest.mark.real

SECRET = "panel-copies-agent-secret"
HELD = "pick.safetensors"   # sent half, then the rest when the test says
BAD = "bad.safetensors"     # sent with other bytes than the file's: the destination refuses it
GONE = "gone.safetensors"   # removed from the source before its copy is asked for
OTHER = "other.safetensors"  # only on the peer without an agent: nobody can send it
SIZE = 3 << 20


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")


class Source:
    """The source agent's file data (GET /lb/agent/file/data) as the agent sends it, but
    HELD stops half way until `release` is set, and BAD comes with its bytes changed."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.release = asyncio.Event()

    async def data(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Range"):  # a resumed copy: as the agent serves it
            return await self.agent.file_data(request)
        at = agent_module.place(self.agent.folders(), request.query.get("folder"), request.query.get("name"),
                                existing=True)
        body = Path(at.path).read_bytes()
        if at.name == BAD:
            body = bytes(len(body))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body[:len(body) // 2])
        if at.name == HELD:
            await self.release.wait()
        await response.write(body[len(body) // 2:])
        await response.write_eof()
        return response


def agent_peer(agent: Agent, folder: Path, data=None) -> dict:
    """A minimal ComfyUI running the real agent: its node catalog and model listing say
    what its checkpoints folder holds, as ComfyUI's do."""
    async def object_info(request: web.Request) -> web.Response:
        return web.json_response(sim_catalog([], files(folder)))

    async def listing(request: web.Request) -> web.Response:
        if request.match_info["folder"] != "checkpoints":
            return web.Response(status=404)
        return web.json_response(files(folder))

    routes = {(m, path): agent.guarded(h) for m, path, h in agent.routes()}
    if data is not None:
        routes[("GET", "/lb/agent/file/data")] = agent.guarded(data)
    return {**routes, ("GET", "/object_info"): object_info, ("GET", "/models"): answer(["checkpoints"]),
            ("GET", "/models/{folder}"): listing}


# every toast the page shows, kept (they go away by themselves)
RECORD_TOASTS = """() => {
  window.__toasts = [];
  new MutationObserver((changes) => { for (const c of changes) for (const n of c.addedNodes)
    if (n.classList?.contains('toast')) window.__toasts.push({error: n.classList.contains('error'), text: n.textContent}); })
    .observe(document.getElementById('toasts'), {childList: true});
}"""
TOASTED = "(want) => window.__toasts.some((t) => t.error === want.error && want.texts.every((x) => t.text.includes(x)))"
TOASTS = "() => window.__toasts"


async def toasted(page, error: bool, *texts: str) -> None:
    await page.wait_for_function(TOASTED, arg={"error": error, "texts": list(texts)}, timeout=15000)


async def test_a_missing_model_is_copied_from_the_panel_with_its_progress(browser, tmp_path):
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    content = os.urandom(SIZE)
    (src_dir / HELD).write_bytes(content)
    (src_dir / BAD).write_bytes(os.urandom(1 << 16))
    (src_dir / GONE).write_bytes(os.urandom(1 << 10))
    exts = {".safetensors"}
    src_agent = Agent(SECRET, folders=lambda: {"checkpoints": ([str(src_dir)], exts)})
    dst_agent = Agent(SECRET, folders=lambda: {"checkpoints": ([str(dst_dir)], exts)})
    source = Source(src_agent)
    plain = await start_sim(name="plain", checkpoints=[OTHER])  # ComfyUI without ComfyLB's agent
    try:
        async with hostile_peer(agent_peer(src_agent, src_dir, source.data)) as (src_port, _), \
                hostile_peer(agent_peer(dst_agent, dst_dir)) as (dst_port, _):
            runner, cluster, url = await start_balancer(
                [BackendConfig(name="src", port=src_port), BackendConfig(name="dst", port=dst_port),
                 BackendConfig(name="plain", port=plain.port)], auth={"agent_secret": SECRET})
            try:
                peers = cluster.peers
                await until(lambda: peers["src"].agent and peers["dst"].agent and peers["plain"].agent is False
                            and all(p.available and p.object_info for p in peers.values()))
                page, errors = await open_page(browser, url + "/", width=460)
                try:
                    await page.evaluate(RECORD_TOASTS)
                    panel = page.locator("#panel .comfylb")
                    dst = panel.locator('.cl-peer[data-peer="dst"]')
                    await dst.locator("button.cl-badge").click(timeout=15000)
                    copy = {name: dst.locator(f'.cl-missing button[data-act="copy"][data-file="{name}"]')
                            for name in (HELD, BAD, GONE)}
                    await copy[HELD].wait_for(timeout=15000)

                    # dst lacks what src has, and src can send it: a button for each file
                    buttons = await dst.locator('.cl-missing button[data-act="copy"]').evaluate_all(
                        "(bs) => bs.map((b) => [b.dataset.file, b.dataset.folder, b.dataset.from, b.disabled])")
                    assert sorted(buttons) == [[f, "checkpoints", "src", False] for f in sorted((BAD, GONE, HELD))]
                    assert await copy[HELD].get_attribute("aria-label") == f"Copy checkpoints/{HELD} to dst from src"
                    assert "from src" in await copy[HELD].get_attribute("title")
                    # what only the peer without an agent has is listed, with no button
                    assert OTHER in await dst.locator(".cl-missing").inner_text()
                    assert await panel.locator(f'button[data-act="copy"][data-file="{OTHER}"]').count() == 0
                    # nor has the peer without an agent a button for what it lacks
                    plain_card = panel.locator('.cl-peer[data-peer="plain"]')
                    await plain_card.locator("button.cl-badge").click()
                    assert HELD in await plain_card.locator(".cl-missing").inner_text()
                    assert await plain_card.locator('button[data-act="copy"]').count() == 0
                    assert await panel.locator(".cl-copy").count() == 0

                    # refused: the file left the source since the list was read
                    (src_dir / GONE).unlink()
                    await copy[GONE].click()
                    await toasted(page, True, f"checkpoints/{GONE}", "not on this peer")
                    assert not [t for t in cluster.transfers.list if t.name == GONE]
                    assert await dst.locator(".cl-copy").count() == 0

                    # a copy that fails: its error stays on the card
                    await copy[BAD].click()
                    await toasted(page, False, f"Copying checkpoints/{BAD} to dst from src")
                    failed = dst.locator('.cl-copy[data-state="failed"]')
                    await failed.wait_for(timeout=15000)
                    text = await failed.inner_text()
                    assert f"checkpoints/{BAD} from src failed" in text and "sha256" in text
                    assert files(dst_dir) == [] and list(dst_dir.iterdir()) == []  # nothing left behind

                    # a real copy: on the card with how far it is while the source holds it half way
                    await copy[HELD].click()
                    await toasted(page, False, f"Copying checkpoints/{HELD} to dst from src")
                    held = next(t for t in cluster.transfers.list if t.name == HELD)
                    await until(lambda: held.done == SIZE // 2)
                    cluster.changed()  # copies tell their progress every half second: this one now
                    line = dst.locator(f'.cl-copy[data-transfer="{held.id}"][data-state="copying"]')
                    await page.wait_for_function(
                        "(id) => document.querySelector(`#panel .cl-copy[data-transfer='${id}'] [role=progressbar]`)"
                        "?.getAttribute('aria-valuenow') === '50'", arg=held.id, timeout=10000)
                    assert (await line.inner_text()).strip() == f"copying checkpoints/{HELD} from src — 50%"
                    assert await dst.locator(".cl-copy").count() == 1  # the newer copy replaced the failed one
                    assert await panel.locator('.cl-peer:not([data-peer="dst"]) .cl-copy').count() == 0
                    assert await copy[HELD].is_disabled()  # already being copied
                    assert not await copy[BAD].is_disabled()
                    source.release.set()
                    await dst.locator(".cl-copy").first.wait_for(state="detached", timeout=15000)
                    assert held.state == "done" and (dst_dir / HELD).read_bytes() == content
                    # what dst has is read again: the file is no longer listed as missing
                    await page.wait_for_function(
                        "(name) => { const l = document.querySelector('#panel .cl-peer[data-peer=\"dst\"] .cl-missing');"
                        " return l && !l.textContent.includes(name) && l.textContent.includes('other.safetensors'); }",
                        arg=HELD, timeout=15000)
                    assert await copy[BAD].count() == 1
                    assert [t["text"] for t in await page.evaluate(TOASTS) if t["error"]] == [
                        f"ComfyLB: Copy of checkpoints/{GONE} to dst: from: peer 'src': HTTP 404: "
                        f"checkpoints/{GONE} is not on this peer"]
                    assert errors == []
                finally:
                    await page.close()
            finally:
                await runner.cleanup()
    finally:
        source.release.set()
        await plain.stop()
