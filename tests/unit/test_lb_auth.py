"""The /lb/* token: required there, never on ComfyUI's own API."""
import aiohttp

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


async def test_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("COMFYLB_TOKEN", "fromenv")
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
            async with s.get(url + "/lb/backends") as r:  # /lb/* has its own token (none here)
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
