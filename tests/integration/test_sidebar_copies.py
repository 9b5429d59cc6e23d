"""A model file copied from the ComfyLB sidebar tab inside ComfyUI (issue 15, item 3), in real
headless Chromium, once with the coordinator ComfyUI's own web UI (frontend 1.32, what 0.3.75
ships) and once with today's (1.58.1, through --front-end-root).

Two real ComfyUI peers run ComfyLB as their agent; one holds checkpoints the other lacks.
In the tab the lacking peer's card wears the "missing" badge; its list names the file with a
copy button; a click starts the copy (a toast says so), the card shows it in progress (the
source's answer is held half way by a proxy in front of the holder, so the test sees it at
50 %), and once released the file lands on the peer's disk with the same sha256, the line
goes, and the badge no longer lists the file.  Each frontend copies a file of its own, so
the two runs need not come in any order."""
from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests import procs
from tests.agents import SECRET, STARTUP, agent_peer, model_bytes
from tests.conftest import coordinator
from tests.integration.test_frontend_current import COMFYLB_TAB, FRONTEND, dismiss_templates

pytestmark = pytest.mark.real

HOLDER, LACKER = "sidebar_holder", "sidebar_lacker"
FILES = {"1.32": "sidebar-fe132.safetensors", FRONTEND: "sidebar-fe158.safetensors"}
STAYS = "sidebar-stays.safetensors"  # never copied: the lacking peer's badge always lists it
SIZE = 3 << 20
ACTIVE = ("queued", "preparing", "copying")
DATA_ROUTE = b"/lb/agent/file/data"  # where a source agent serves a model file's bytes


class HoldingProxy:
    """A TCP proxy in front of a real peer: every byte passes both ways as it comes (HTTP,
    websockets, the agent's signed calls), except the answer to a download of a file told
    to hold(): its head and half its body pass, the rest once release() is called."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.holds: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}  # file → (held, released)
        self.answers: dict[str, tuple[str, int | None]] = {}  # file → its download's status line, length
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def hold(self, name: str) -> None:
        self.holds[name] = (asyncio.Event(), asyncio.Event())

    async def held(self, name: str, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.holds[name][0].wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"the holder's agent was not asked for {name} at {DATA_ROUTE.decode()} "
                                 f"within {timeout} s") from None

    def release(self, name: str) -> None:
        self.holds[name][1].set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for _, released in self.holds.values():
            released.set()
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()
        if self.server is not None:
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        asked: list[str] = []  # a held file this connection asked for, until its answer is held
        try:
            await asyncio.gather(self._requests(reader, up_writer, asked), self._answers(up_reader, writer, asked),
                                 return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                w.close()
                self.writers.discard(w)

    async def _requests(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, asked: list[str]) -> None:
        while data := await src.read(1 << 16):
            for line in data.split(b"\r\n"):
                if line.startswith(b"GET " + DATA_ROUTE + b"?"):
                    name = parse_qs(urlsplit(line.split(b" ")[1].decode()).query).get("name", [""])[0]
                    if name in self.holds and not self.holds[name][0].is_set():
                        asked.append(name)
            dst.write(data)  # after noting it: the answer comes only once the request is sent
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()

    async def _answers(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, asked: list[str]) -> None:
        buffered = b""
        while data := await src.read(1 << 16):
            if not asked:
                dst.write(data)
                await dst.drain()
                continue
            buffered += data
            head = buffered.find(b"\r\n\r\n")
            if head < 0:
                continue
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", buffered[:head])
            cut = head + 4 + (int(length[1]) // 2 if length else 0)
            if len(buffered) < cut:
                continue
            name = asked.pop()
            self.answers[name] = (buffered[:buffered.find(b"\r\n")].decode(), int(length[1]) if length else None)
            held, released = self.holds[name]
            dst.write(buffered[:cut])
            await dst.drain()
            held.set()
            await released.wait()
            dst.write(buffered[cut:])
            await dst.drain()
            buffered = b""
        if buffered:
            dst.write(buffered)
        if dst.can_write_eof():
            dst.write_eof()


async def lb_get(url: str) -> Any:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            r.raise_for_status()
            return await r.json()


async def until(cond: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """cond() (a coroutine function) until it returns something true, polled."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await cond()
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            last = e
        else:
            if last:
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def lacks(inventory: dict, peer: str) -> list[str]:
    return inventory["backends"].get(peer, {}).get("lacks", {}).get("models", {}).get("checkpoints", [])


@pytest.fixture(scope="module")
async def sidebar(comfy_env, workdir):
    """The two agent peers (the holder behind a HoldingProxy) and a coordinator ComfyUI per
    frontend over them, all started together; stopped at the end of the module."""
    holder = agent_peer(comfy_env, workdir, HOLDER, {name: model_bytes(name) for name in (*FILES.values(), STAYS)})
    lacker = agent_peer(comfy_env, workdir, LACKER, {})
    proxy = HoldingProxy(holder.port)
    coords: dict[str, procs.Proc] = {}
    try:
        config = {"health_check": {"interval": 1.0, "timeout": 2.0}, "auth": {"agent_secret": SECRET},
                  "backends": [{"name": HOLDER, "host": "127.0.0.1", "port": await proxy.start(), "max_queue": 1},
                               {"name": LACKER, "host": "127.0.0.1", "port": lacker.port, "max_queue": 1}]}
        coords["1.32"] = coordinator(comfy_env, workdir, "sidebar_coord132", config)
        coords[FRONTEND] = coordinator(comfy_env, workdir, "sidebar_coord158", config,
                                       extra_args=["--front-end-root", comfy_env["frontend_current"]])
        # blocking waits in threads: the proxy serves on this loop meanwhile
        await asyncio.gather(*(asyncio.to_thread(p.wait_ready, "/system_stats", STARTUP)
                               for p in (holder, lacker, *coords.values())))
        await asyncio.gather(*(asyncio.to_thread(procs.wait_backends, c, {HOLDER, LACKER}) for c in coords.values()))
        for c in coords.values():
            async def agents_and_inventory(c: procs.Proc = c) -> bool:
                backends = (await lb_get(c.url + "/lb/backends"))["backends"]
                wanted = {*FILES.values(), STAYS}
                return (all(b["agent"] is True for b in backends)
                        and wanted <= set(lacks(await lb_get(c.url + "/lb/inventory"), LACKER)))
            await until(agents_and_inventory, f"{c.name}: both agents found, the lacking peer's files known")
        yield coords, proxy, holder, lacker
    finally:
        for p in coords.values():
            await asyncio.to_thread(p.stop)
        await proxy.close()
        for p in (holder, lacker):
            await asyncio.to_thread(p.stop)


# Every toast the page shows, recorded from its first script on (they go away by themselves):
# PrimeVue's in frontend 1.32, 1.58.1's own ([data-testid=toast], its kind in data-toast-kind).
RECORD_TOASTS = """
(() => {
  const seen = window.__comfylbToasts = [];
  const scan = () => {
    for (const t of document.querySelectorAll("[data-testid=toast], .p-toast-message")) {
      const kind = t.dataset.toastKind
        || ((t.className || "").match(/p-toast-message-(success|info|warn|error)/) || [])[1];
      const text = (t.innerText || "").trim();
      if (text && !seen.some((s) => s.kind === kind && s.text === text)) seen.push({kind, text});
    }
  };
  new MutationObserver(scan).observe(document, {subtree: true, childList: true, characterData: true});
})();
"""
TOASTED = ("(want) => window.__comfylbToasts.some((t) => t.kind === want.kind"
           " && want.texts.every((x) => t.text.includes(x)))")


@pytest.mark.parametrize("frontend", list(FILES), ids=[f"frontend-{v}" for v in FILES])
async def test_a_missing_model_is_copied_from_the_sidebar_tab(browser, sidebar, frontend):
    coords, proxy, holder, lacker = sidebar
    coord, file = coords[frontend], FILES[frontend]
    what = f"checkpoints/{file}"
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        await page.add_init_script(RECORD_TOASTS)
        await page.goto(coord.url)
        tab = page.locator(COMFYLB_TAB).first
        await tab.wait_for(timeout=90000)
        version = await page.evaluate("window.__COMFYUI_FRONTEND_VERSION__")
        # the web UI this run is about: 1.58.1 exactly, or 0.3.75's own 1.32.x
        assert version == FRONTEND if frontend == FRONTEND else version.startswith(frontend + "."), version
        await dismiss_templates(page)
        await tab.click()

        panel = page.locator(".comfylb")
        card = panel.locator(f'.cl-peer[data-peer="{LACKER}"]')
        badge = card.locator("button.cl-badge")
        await badge.wait_for(timeout=30000)
        title = await badge.get_attribute("title")
        assert file in title and STAYS in title, title  # the list on hover
        # the holder lacks nothing the other has: no badge, nothing being copied anywhere
        assert await panel.locator(f'.cl-peer[data-peer="{HOLDER}"] button.cl-badge').count() == 0
        assert await panel.locator(".cl-copy").count() == 0

        await badge.click()
        button = card.locator(f'.cl-missing .cl-file[data-file="{file}"] button[data-act="copy"]')
        await button.wait_for(timeout=10000)
        assert "checkpoints" in await card.locator(".cl-missing").inner_text()
        assert await button.evaluate("(b) => [b.dataset.folder, b.dataset.from, b.disabled]") == [
            "checkpoints", HOLDER, False]
        assert await button.get_attribute("aria-label") == f"Copy {what} to {LACKER} from {HOLDER}"

        proxy.hold(file)
        await button.click()
        await page.wait_for_function(
            TOASTED, arg={"kind": "success", "texts": [f"Copying {what} to {LACKER} from {HOLDER}"]}, timeout=15000)

        # in progress on the lacking peer's card while the source is held half way
        line = card.locator(".cl-copy")
        await line.wait_for(timeout=15000)
        assert await line.get_attribute("data-state") in ACTIVE
        assert f"{what} from {HOLDER}" in await line.inner_text()
        assert await panel.locator(f'.cl-peer[data-peer="{HOLDER}"] .cl-copy').count() == 0
        await button.wait_for(timeout=5000)
        assert await button.is_disabled()  # already being copied
        await proxy.held(file, 30)
        assert proxy.answers[file] == ("HTTP/1.1 200 OK", SIZE), proxy.answers[file]
        copy_id = await line.get_attribute("data-transfer")

        async def read_half() -> dict | None:
            t = next(t for t in (await lb_get(coord.url + "/lb/transfers"))["transfers"] if t["id"] == copy_id)
            return t if t["done"] == SIZE // 2 else None
        half = await until(read_half, "the coordinator to read the half the holder sent", 30)
        assert (half["state"], half["total"], half["peer"], half["source"]) == ("copying", SIZE, LACKER, HOLDER)
        # the panel's own "Check now" reads /lb/status again (progress is pushed at most every 0.5 s)
        await panel.locator('button[data-act="check"]').click()
        await page.wait_for_function(
            "(id) => document.querySelector(`.comfylb .cl-copy[data-transfer='${id}'] [role=progressbar]`)"
            "?.getAttribute('aria-valuenow') === '50'", arg=copy_id, timeout=15000)
        assert (await line.inner_text()).strip() == f"copying {what} from {HOLDER} — 50%"
        assert await line.get_attribute("data-state") == "copying"

        proxy.release(file)
        await line.wait_for(state="detached", timeout=30000)
        landed = lacker.home / "models" / "checkpoints" / file
        assert landed.is_file(), sorted(p.name for p in landed.parent.iterdir())
        assert hashlib.sha256(landed.read_bytes()).hexdigest() == hashlib.sha256(model_bytes(file)).hexdigest()
        assert not [p.name for p in landed.parent.iterdir() if p.name.startswith(".")]  # no partial file left
        done = next(t for t in (await lb_get(coord.url + "/lb/transfers"))["transfers"] if t["id"] == copy_id)
        assert done["state"] == "done" and done["done"] == SIZE, done

        # what the peer has is read again: the open list no longer names the file, still the other one
        await page.wait_for_function(
            "([peer, file, stays]) => {"
            " const l = document.querySelector(`.comfylb .cl-peer[data-peer='${peer}'] .cl-missing`);"
            " return Boolean(l) && !l.textContent.includes(file) && l.textContent.includes(stays); }",
            arg=[LACKER, file, STAYS], timeout=30000)
        title = await badge.get_attribute("title")
        assert file not in title and STAYS in title, title
        assert await card.locator(f'.cl-file[data-file="{file}"]').count() == 0
        toasts = await page.evaluate("window.__comfylbToasts")
        assert not [t for t in toasts if t["kind"] == "error"], toasts
        assert not [e for e in errors if "comfylb" in e.lower()], errors
    finally:
        if file in proxy.holds:
            proxy.release(file)
        await page.close()
