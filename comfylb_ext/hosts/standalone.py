"""The standalone host: ComfyLB's own aiohttp server in front of the peers."""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import WSMsgType, web

from ..access import Access, cross_site_refusal
from ..api.comfy import MAX_UPLOAD_SIZE, STANDALONE, ComfyApi
from ..api.lb import LbApi
from ..config import Config
from ..dispatcher import Cluster
from ..peer import INSTANCE_HEADER
from .. import errors
from ..pgstore import open_store
from ..proxy import close_sockets
from ..uploads import InputStore
from ..workers import Install, knows_flag, resolve

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CLUSTER = web.AppKey("cluster", Cluster)


class SocketHub:
    """Client websockets by sid.  Several sockets may share a sid (a client that
    reconnects with the same clientId before its old socket is gone): all receive,
    and closing the old one never silences the new one."""

    def __init__(self) -> None:
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}
        self.flags: dict[str, dict] = {}
        self.watchers: set[web.WebSocketResponse] = set()  # receive live state (Hub.watch)

    def add(self, sid: str, ws: web.WebSocketResponse) -> None:
        self.sockets.setdefault(sid, set()).add(ws)

    def remove(self, sid: str, ws: web.WebSocketResponse) -> None:
        self.watchers.discard(ws)
        group = self.sockets.get(sid)
        if group is not None:
            group.discard(ws)
            if not group:
                del self.sockets[sid]
                self.flags.pop(sid, None)

    def client_flags(self, sid: str) -> dict:
        return self.flags.get(sid, {})

    def watch(self, sid: str) -> bool:
        group = self.sockets.get(sid)
        self.watchers |= group or set()
        return bool(group)

    async def send_watchers(self, event: str, data: Any) -> None:
        if self.watchers:
            text = json.dumps({"type": event, "data": data})
            for ws in list(self.watchers):
                await _quietly(ws.send_str(text))

    def connected(self, sid: str) -> bool:
        return bool(self.sockets.get(sid))

    def _targets(self, sid: str | None) -> list[web.WebSocketResponse]:
        if sid is None:
            return [ws for group in self.sockets.values() for ws in group]
        return list(self.sockets.get(sid, ()))

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        targets = self._targets(sid)
        if targets:
            text = json.dumps({"type": event, "data": data})
            for ws in targets:
                await _quietly(ws.send_str(text))

    async def send_bytes(self, event: int, payload: bytes, sid: str | None = None) -> None:
        targets = self._targets(sid)
        if targets:
            frame = event.to_bytes(4, "big") + payload
            for ws in targets:
                await _quietly(ws.send_bytes(frame))

    async def close_all(self) -> None:
        """Close every client socket as a server going away does (ComfyUI's web UI then
        reconnects): an open socket holds aiohttp's graceful shutdown until its handler
        ends, which a connected client never lets happen."""
        await close_sockets([ws for group in self.sockets.values() for ws in group], b"server shutdown")


async def _quietly(coro: Awaitable[Any]) -> None:
    try:
        await coro
    except (ConnectionError, RuntimeError):
        pass  # the socket is closing; its handler cleans up


def web_dir() -> Path:
    """The panel's files: web/ in a checkout, comfylb_ext/web in an installed wheel."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "web", here.parents[2] / "web"):
        if (candidate / "standalone.html").is_file():
            return candidate
    raise FileNotFoundError("the panel's web/ folder is missing from this installation")


def _guard(access: Access) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Cross-site requests, and ComfyUI's client API and /ws when a token guards them
        (LbApi guards /lb/* itself, as in the extension)."""
        path = request.path
        if not access.origin_ok(request):
            return cross_site_refusal(path)
        if path.startswith("/lb/") or path == "/" or path.startswith("/comfylb/"):
            return await handler(request)
        if access.api_token and not access.api_allowed(request):
            return web.json_response(errors.error_body(errors.error("unauthorized", "A token is needed for this ComfyLB",
                                                     "send Authorization: Bearer <token> or ?token=<token>")),
                                     status=401)
        return await handler(request)
    return guard


def build_app(cfg: Config) -> web.Application:
    hub = SocketHub()
    store = InputStore(Path(cfg.storage.dir) / "files")
    cluster = Cluster(cfg, hub, store, open_store(cfg))
    api = ComfyApi(cluster, store, MAX_UPLOAD_SIZE)
    w = cfg.workers  # standalone: comfyui and python are checked at start (workers.check_install)
    workers = resolve(w, Install(w.comfyui, w.python, database_url=knows_flag(w.comfyui, "--database-url")),
                      cfg.storage.dir)
    # the panel's session cookie also opens /ws, which its page uses for live state
    access = Access.of(cfg, cookie_paths=("/lb", "/ws"))
    log.info("access: %s", access.describe())
    app = web.Application(client_max_size=MAX_UPLOAD_SIZE, middlewares=[_guard(access)])
    app[CLUSTER] = cluster

    async def sign(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[INSTANCE_HEADER] = cluster.instance_id  # so it is never its own peer
    app.on_response_prepare.append(sign)

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
        ws = web.WebSocketResponse(max_msg_size=MAX_UPLOAD_SIZE, heartbeat=30.0)
        await ws.prepare(request)
        hub.add(sid, ws)
        try:
            await ws.send_json({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": cluster.ledger.remaining()}}, "sid": sid}})
            await cluster.relay.deliver_kept(sid)  # results of prompts that ended while it was away
            first = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT or not first:
                    continue
                first = False  # as in ComfyUI, only the first text message means anything
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("type") == "feature_flags" and isinstance(data.get("data"), dict):
                    hub.flags[sid] = data["data"]
                    await ws.send_json({"type": "feature_flags", "data": api.feature_flags()})
        finally:
            hub.remove(sid, ws)
        return ws

    app.router.add_get("/ws", websocket)
    web_root = web_dir()

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(web_root / "standalone.html", headers={"Cache-Control": "no-cache"})

    async def ready(request: web.Request) -> web.Response:
        """For an orchestrator's readiness probe (no token: it says nothing else)."""
        return web.json_response({"ready": True, "role": "leader" if cfg.storage.url else "alone"})

    app.router.add_get("/", index)
    app.router.add_get("/lb/ready", ready)
    app.router.add_static("/comfylb/js", web_root / "js")
    for method, path, handler in LbApi(cluster, access, workers).routes():
        app.router.add_route(method, path, handler)
    for route in api.routes():
        if route.serves(STANDALONE):
            app.router.add_route(route.method, "/api" + route.path, route.handler)
            app.router.add_route(route.method, route.path, route.handler)
    app.router.add_route("*", "/{tail:.*}", api.forward)  # last: only what nothing above answers

    async def on_startup(app: web.Application) -> None:
        await cluster.start()
        await workers.start(cluster, cfg.workers)

    async def on_shutdown(app: web.Application) -> None:
        await hub.close_all()

    async def on_cleanup(app: web.Application) -> None:
        await workers.stop()  # before the cluster: their peers' links may drop quietly
        await cluster.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
