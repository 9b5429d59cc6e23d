"""A stand-by coordinator while no coordinator leads: every answer is a clear 503 in the
shape its caller reads (ComfyUI's error dict for ComfyUI's routes, ComfyLB's on /lb/*)."""
from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from comfylb_ext.proxy import NO_LEADER, standby_app


@pytest.fixture
async def standby():
    async def no_leader():
        return None
    runner = web.AppRunner(standby_app(no_leader), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.mark.parametrize("method, path", [("POST", "/prompt"), ("POST", "/api/prompt"), ("GET", "/queue"),
                                          ("GET", "/api/jobs")])
async def test_comfyui_routes_get_comfyuis_error_shape(standby, method, path):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, standby + path, json={"prompt": {}}) as r:
            body = await r.json()
            assert r.status == 503 and r.headers["Retry-After"] == "2"
    assert body["error"]["type"] == "coordinator_unavailable" and body["error"]["message"] == NO_LEADER
    assert body["node_errors"] == {}


async def test_lb_routes_and_readiness_say_so_plainly(standby):
    async with aiohttp.ClientSession() as s:
        async with s.get(standby + "/lb/backends") as r:
            assert r.status == 503 and (await r.json()) == {"error": NO_LEADER}
        async with s.get(standby + "/lb/ready") as r:
            assert r.status == 503 and (await r.json()) == {"ready": False, "role": "standby"}
