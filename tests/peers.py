"""Peers written for a test: a minimal ComfyUI whose routes the test replaces."""
from __future__ import annotations

import contextlib

from aiohttp import web

from comfylb_ext.sim import catalog as sim_catalog


def answer(body, **kw):
    """A handler that always answers `body` as JSON."""
    async def handler(request):
        return web.json_response(body, **kw)
    return handler


@contextlib.asynccontextmanager
async def hostile_peer(routes: dict | None = None, ws=None):
    """A peer written for the test: a minimal ComfyUI (websocket, /system_stats,
    /object_info, …) whose routes the test replaces; every path it receives, raw, is in
    the list it yields."""
    seen: list[str] = []

    @web.middleware
    async def record(request, handler):
        seen.append(request.raw_path)
        return await handler(request)

    async def default_ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "x"}})
        async for _ in sock:
            pass
        return sock

    async def stats(request):
        return web.json_response({"system": {"os": "hostile"}, "devices": []})

    async def anything(request):
        return web.json_response({})

    table = {("GET", "/ws"): ws or default_ws, ("GET", "/system_stats"): stats,
             ("GET", "/object_info"): answer(sim_catalog([], ["sim-a.safetensors"])),
             ("GET", "/node_replacements"): answer({}), **(routes or {})}
    app = web.Application(middlewares=[record], client_max_size=1 << 30)
    for (method, path), handler in table.items():
        app.router.add_route(method, path, handler)
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)  # some handlers never return
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], seen
    finally:
        await runner.cleanup()
