"""A stand-by coordinator while no coordinator leads: every answer is a clear 503 in the
shape its caller reads (ComfyUI's error dict for ComfyUI's routes, ComfyLB's on /lb/*)."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

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


# -- passing on to a leader: what of a client's request reaches it, and what comes back ----
EVIL = "http://evil.example"


def echo_leader() -> web.Application:
    """A leader that answers with what it received; refuses a cross-site websocket (as the
    real one does) and bodies over 1 KB."""
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        resp = web.json_response({"raw": request.rel_url.raw_path_qs, "query": dict(request.query),
                                  "headers": {k.lower(): v for k, v in request.headers.items()}, "size": len(body)})
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.headers["Connection"] = "keep-alive, X-Leader-Hop"
        resp.headers["X-Leader-Hop"] = "only for the next hop"
        return resp

    async def ws(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Origin") == EVIL:
            return web.json_response({"error": "cross-site"}, status=403)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(b"echo:" + msg.data)
        return sock

    app = web.Application(client_max_size=1024)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def through():
    """A stand-by passing clients on to echo_leader(): its URL."""
    leader_runner, leader = await _serve(echo_leader())

    async def the_leader():
        return leader
    standby_runner, url = await _serve(standby_app(the_leader))
    yield url
    await standby_runner.cleanup()
    await leader_runner.cleanup()


async def test_the_path_and_query_reach_the_leader_as_the_client_sent_them(through):
    raw = "/view?filename=a%23b%26c%2Fd.png&subfolder=x%20y&type=input"
    async with aiohttp.ClientSession() as s, s.get(URL(through + raw, encoded=True)) as r:
        got = await r.json()
    assert got["raw"] == raw
    assert got["query"] == {"filename": "a#b&c/d.png", "subfolder": "x y", "type": "input"}


async def test_hop_by_hop_headers_stay_behind_and_host_goes_on(through):
    headers = {"Connection": "keep-alive, X-Client-Hop", "X-Client-Hop": "secret of this hop",
               "Proxy-Authorization": "Basic eA==", "TE": "trailers", "Host": "cluster.example:8188",
               "Authorization": "Bearer t", "Origin": "http://cluster.example:8188"}
    async with aiohttp.ClientSession() as s, s.post(through + "/prompt", data=b"{}", headers=headers) as r:
        got = await r.json()
        back = r.headers
    sent = got["headers"]
    assert not {"x-client-hop", "proxy-authorization", "te"} & set(sent)
    assert sent["host"] == "cluster.example:8188" and sent["authorization"] == "Bearer t"
    assert sent["origin"] == "http://cluster.example:8188" and got["size"] == 2
    assert back.getall("Set-Cookie") == ["a=1", "b=2"] and "X-Leader-Hop" not in back


async def test_a_body_too_large_for_the_leader_gets_the_leaders_answer(through):
    async with aiohttp.ClientSession() as s, s.post(through + "/upload/image", data=b"x" * 4096) as r:
        assert r.status == 413


async def test_websocket_messages_go_both_ways(through):
    async with aiohttp.ClientSession() as s, s.ws_connect(through + "/ws?clientId=c1") as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "echo:hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=5)).data == b"echo:\x00\x01"


async def test_a_websocket_the_leader_refuses_is_refused_not_a_missing_leader(through):
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(through + "/ws?clientId=c1", headers={"Origin": EVIL})
    assert refused.value.status == 403  # not 503 + Retry-After: retrying would never help


async def test_more_websockets_than_a_connection_pool_holds_all_go_through(through):
    """Each is a connection to the leader for as long as it is open (aiohttp's default pool
    holds 100: the 101st client waited for ever)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        sockets = await asyncio.wait_for(asyncio.gather(*(s.ws_connect(through + f"/ws?clientId=c{i}")
                                                          for i in range(150))), 30)
        for i, ws in enumerate(sockets):
            await ws.send_str(f"{i}")
        assert [(await ws.receive(timeout=10)).data for ws in sockets] == [f"echo:{i}" for i in range(150)]
        await asyncio.gather(*(ws.close() for ws in sockets))
