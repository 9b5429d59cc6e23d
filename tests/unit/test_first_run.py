"""First run, as a new user meets it: why prompts wait, the demo's own state."""
from __future__ import annotations

import asyncio

from comfylb_ext import __main__ as cli
from tests.client import Client, sleep_prompt
from tests.simcluster import lb_over_sims, wait_for


async def test_prompts_waiting_for_no_peer_say_why(caplog):
    async with lb_over_sims(1) as (url, sims, cluster):
        async with Client(url) as c:
            assert (await c.post("/lb/backends/sim0/disable"))[0] == 200
            _, _, run = await c.queue(sleep_prompt(0.01))
            _, stats = await c.get("/lb/stats")
            assert stats["waiting"] == "no peer is available: sim0 is disabled"
            assert any("prompt(s) wait: no peer is available" in r.getMessage() for r in caplog.records)
            # the submitter is told on its socket, without the peers' names (any client reads it)
            await c.until(lambda: "comfylb.waiting" in run.types())
            told = run.first("comfylb.waiting")
            assert "no peer is available" in told["reason"] and "sim0" not in told["reason"]
            async with Client(url) as other:  # a second prompt while the wait lasts is told too
                _, _, run2 = await other.queue(sleep_prompt(0.01))
                await other.until(lambda: "comfylb.waiting" in run2.types())
            await c.post("/lb/backends/sim0/enable")
            await asyncio.wait_for(run.done.wait(), 10)
            await wait_for(lambda: cluster.stats()["waiting"] is None, cluster)
            assert run.types().count("comfylb.waiting") == 1


def test_the_demo_keeps_its_own_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}

    async def serve(cfg, demo):
        seen["dir"], seen["demo"] = cfg.storage.dir, demo
    monkeypatch.setattr(cli, "_serve", serve)
    assert cli.main(["--demo"]) == 0
    assert seen["demo"] and seen["dir"] != "comfylb-data" and "demo" in seen["dir"]


async def test_a_peer_that_is_this_balancer_itself_is_refused_with_a_clear_message():
    from comfylb_ext.config import BackendConfig

    async with lb_over_sims(1) as (url, sims, cluster):
        async with Client(url) as c:
            port = int(url.rsplit(":", 1)[1])
            status, body = await c.post("/lb/backends", {"name": "me", "host": "127.0.0.1", "port": port})
            assert status == 400 and "this ComfyLB itself" in body["error"]
            await wait_for(lambda: "me" not in cluster.peers, cluster)
            cluster.add_peer(BackendConfig(name="me2", port=port))  # as from a copied config
            await wait_for(lambda: cluster.peers["me2"].health.last_error is not None, cluster)
            assert "this ComfyLB itself" in cluster.peers["me2"].health.last_error
            assert not cluster.peers["me2"].available


async def test_peers_that_cannot_be_used_say_why_in_words():
    from aiohttp import web

    from comfylb_ext.config import BackendConfig
    from tests.procs import free_port

    other = web.AppRunner(web.Application(), shutdown_timeout=0.1)  # answers, but is not ComfyUI
    await other.setup()
    site = web.TCPSite(other, "127.0.0.1", 0)
    await site.start()
    try:
        async with lb_over_sims(1) as (url, sims, cluster):
            cluster.add_peer(BackendConfig(name="nobody", port=free_port()))
            cluster.add_peer(BackendConfig(name="website", port=other.addresses[0][1]))
            errors = lambda: {n: cluster.peers[n].health.last_error for n in ("nobody", "website")}  # noqa: E731
            await wait_for(lambda: all(errors().values()), cluster)
            assert "nothing listens at http://127.0.0.1:" in errors()["nobody"]
            assert "answers, but is not ComfyUI" in errors()["website"]
    finally:
        await other.cleanup()


async def test_peers_say_whether_they_come_from_the_config_or_were_added_at_runtime():
    async with lb_over_sims(2) as (url, sims, cluster):
        async with Client(url) as c:
            async with c.session.delete(url + "/lb/backends/sim1") as r:
                assert r.status == 200
            await wait_for(lambda: "sim1" not in cluster.peers, cluster)
            status, body = await c.post("/lb/backends", {"name": "extra", "host": "127.0.0.1", "port": sims[1].port})
            assert status == 201 and body["source"] == "runtime"
            _, listed = await c.get("/lb/backends")
            assert {b["name"]: b["source"] for b in listed["backends"]} == {"sim0": "config", "extra": "runtime"}


async def test_readiness_is_answered_without_a_token_and_says_nothing_else():
    async with lb_over_sims(1, auth={"token": "t0ken"}) as (url, sims, cluster):
        async with Client(url) as c:
            assert await c.get("/lb/ready", params={"x": "y" * 5000}) == (200, {"ready": True, "role": "alone"})
            status, _ = await c.post("/lb/ready", {"ready": False})
            assert 400 <= status < 500  # only GET reads it
            assert (await c.get("/lb/status"))[0] == 401  # the rest of /lb/* still wants the token
