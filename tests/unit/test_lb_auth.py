"""The /lb/* token: required there, never on ComfyUI's own API."""
import aiohttp

from tests.client import Client, invert_prompt
from tests.simcluster import lb_over_sims


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
