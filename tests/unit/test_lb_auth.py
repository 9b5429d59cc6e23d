"""Tokens: auth.token guards /lb/*, else auth.api_token does; auth.api_token guards
ComfyUI's API; a malformed Authorization header is a 401, never a 500."""
import asyncio
import logging

import aiohttp
import pytest

from tests.client import Client, invert_prompt
from tests.simcluster import lb_over_sims, wait_for


async def test_token_guards_lb_routes_only():
    async with lb_over_sims(1, auth={"token": "s3cret"}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                async with s.get(url + "/lb/stats", headers=headers) as r:
                    assert r.status == 401 and "token" in (await r.json())["error"]
            async with s.get(url + "/lb/stats", headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
            async with s.post(url + "/lb/scheduler/strategy/round_robin") as r:
                assert r.status == 401
        async with Client(url) as c:  # ComfyUI's API: no token needed
            run = await c.run(invert_prompt())
            assert "execution_success" in run.types()


@pytest.mark.parametrize("variable", ["COMFYLB_TOKEN", "COMFYLB_API_TOKEN"])  # the API token guards /lb too
async def test_a_token_from_the_environment_guards_lb(monkeypatch, variable):
    monkeypatch.setenv(variable, "fromenv")
    async with lb_over_sims(1) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/lb/backends") as r:
                assert r.status == 401
            async with s.get(url + "/lb/backends", headers={"Authorization": "Bearer fromenv"}) as r:
                assert r.status == 200


async def test_api_token_guards_comfyuis_api_and_websocket():
    async with lb_over_sims(1, auth={"api_token": "open-sesame"}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/queue") as r:
                body = await r.json()
                assert r.status == 401 and body["error"]["type"] == "unauthorized" and body["node_errors"] == {}
            async with s.get(url + "/queue", params={"token": "open-sesame"}) as r:
                assert r.status == 200
            async with s.get(url + "/lb/backends") as r:  # no auth.token: api_token guards /lb/* too
                assert r.status == 401
            async with s.get(url + "/lb/backends", headers={"Authorization": "Bearer open-sesame"}) as r:
                assert r.status == 200
            try:
                await s.ws_connect(url.replace("http", "ws") + "/ws?clientId=x")
                raise AssertionError("websocket accepted without a token")
            except aiohttp.WSServerHandshakeError as e:
                assert e.status == 401
            ws = await s.ws_connect(url.replace("http", "ws") + "/ws?clientId=x",
                                    headers={"Authorization": "Bearer open-sesame"})
            assert (await ws.receive_json())["type"] == "status"
            await ws.close()


async def test_peer_credentials_reach_the_peer():
    from comfylb_ext.config import parse_backend
    from comfylb_ext.sim import start_sim

    guarded = await start_sim(name="guarded", token="peer-secret")
    try:
        async with lb_over_sims(1) as (url, sims, cluster):
            without = cluster.add_peer(parse_backend({"name": "no-creds", "port": guarded.port}))
            with_token = cluster.add_peer(parse_backend({"name": "creds", "port": guarded.port,
                                                         "token": "peer-secret"}))
            await wait_for(lambda: with_token.available and without.health.state == "unhealthy", cluster)
            assert "401" in without.health.last_error
            assert "peer-secret" not in str(with_token.describe())
            cluster.set_enabled("sim0", False)
            async with Client(url) as c:
                run = await c.run(invert_prompt())
                assert "execution_success" in run.types()
            assert run.prompt_id in guarded.sim.history
    finally:
        await guarded.stop()


async def test_a_configured_token_never_leaves_lb_open():
    """auth.api_token alone (the README's 'exposed beyond localhost' setup) guards /lb/*;
    auth.token, when set, guards /lb/* and the api token does not open it."""
    async with lb_over_sims(1, auth={"api_token": "api"}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for path in ("/lb/backends", "/lb/status", "/lb/stats", "/lb/tasks"):
                async with s.get(url + path) as r:
                    assert r.status == 401, path
            async with s.post(url + "/lb/backends", json={"name": "rogue", "host": "127.0.0.1", "port": 1}) as r:
                assert r.status == 401 and "rogue" not in cluster.peers
    async with lb_over_sims(1, auth={"api_token": "api", "token": "admin"}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for token, status in (("api", 401), ("admin", 200)):
                async with s.get(url + "/lb/backends", headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == status, token
            async with s.get(url + "/queue", headers={"Authorization": "Bearer api"}) as r:
                assert r.status == 200
            async with s.get(url + "/queue") as r:
                assert r.status == 401


async def raw_status(url: str, request: bytes) -> int:
    """Send bytes as they are (aiohttp's client would refuse to send most of these)."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1])
    finally:
        writer.close()


MALFORMED = [b"Bearer \xc3\xbc\xc3\xbc", b"Bearer \xff\xfe", "Bearer s3crét".encode(), b"Basic czNjcmV0",
             b"bearer", b"Bearer", b"Bearer  ", b"garbage", b"\x00\x01", b"Bearer s3cret s3cret",
             b"Bearer " + b"x" * 6000]


@pytest.mark.parametrize("header", MALFORMED)
async def test_malformed_authorization_is_401_not_500(header):
    async with lb_over_sims(1, auth={"token": "s3cret", "api_token": "s3cret"}) as (url, sims, cluster):
        for target in (b"GET /lb/stats", b"GET /queue", b"GET /ws?clientId=x", b"GET /view?filename=a.png&token=%C3%BC",
                       b"GET /queue?token=%FF"):
            status = await raw_status(url, target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + header +
                                      b"\r\nConnection: close\r\n\r\n")
            assert status in (400, 401), (target, header, status)  # 400: aiohttp refuses a NUL itself
            status = await raw_status(url, target + b" HTTP/1.1\r\nHost: x\r\nCookie: comfylb_session=" + header +
                                      b"\r\nConnection: close\r\n\r\n")
            assert status in (400, 401), (target, header, status)
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/queue", params={"token": "s3crét"}) as r:
                assert r.status == 401


async def test_the_log_says_what_is_guarded(caplog):
    caplog.set_level(logging.INFO)
    for auth, lb, api in (({}, "open", "open"), ({"token": "a"}, "guarded by auth.token", "open"),
                          ({"api_token": "b"}, "guarded by auth.api_token", "guarded by auth.api_token"),
                          ({"token": "a", "api_token": "b"}, "guarded by auth.token", "guarded by auth.api_token")):
        caplog.clear()
        async with lb_over_sims(1, auth=auth):
            pass
        lines = [r.getMessage() for r in caplog.records if "/lb/*" in r.getMessage()]
        assert len(lines) == 1 and f"/lb/* {lb}" in lines[0] and f"ComfyUI's API {api}" in lines[0], (auth, lines)
