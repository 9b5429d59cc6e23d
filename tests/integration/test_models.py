"""Model copies between real ComfyUI peers (issue 15, item 3): two peers run ComfyLB as their
agent (role: peer, a shared auth.agent_secret), one holds checkpoints the other lacks.  The
inventory shows it; POST /lb/backends/{b}/models copies one with the same sha256, the
receiving ComfyUI's /object_info then lists it and a prompt naming it runs there; with
provisioning on_demand, a prompt that needs a model only a busy peer has completes on the
idle one after a copy.  Bad input is refused and leaves nothing behind.

The prompts use a test node (tests/data/custom_nodes/comfylb_probe) that names a checkpoint
as model loaders do and shows the file's sha256 instead of loading it: CPU, no real model."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import urllib.request

import aiohttp
import pytest
from aiohttp import web

from tests import procs
from tests.agents import SECRET, STARTUP, agent_peer, model_bytes
from tests.client import Client, sleep_prompt

pytestmark = pytest.mark.real


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def probe_prompt(name: str) -> dict:
    return {"1": {"class_type": "ComfyLBModelProbe", "inputs": {"ckpt_name": name}}}


def leftovers(peer: procs.Proc) -> list[str]:
    return sorted(f.name for f in (peer.home / "models" / "checkpoints").iterdir() if f.name.startswith("."))


@pytest.fixture(scope="module")
def cluster(comfy_env, workdir):
    holder = agent_peer(comfy_env, workdir, "agent_a", {"copy-me.safetensors": model_bytes("copy"),
                                                        "on-demand.safetensors": model_bytes("demand"),
                                                        "holder-off.safetensors": model_bytes("off")})
    other = agent_peer(comfy_env, workdir, "agent_b", {})
    lb = None
    try:
        for p in (holder, other):
            p.wait_ready("/system_stats", STARTUP)
        lb = procs.start_balancer(workdir, "models_lb", [
            {"name": p.name, "host": "127.0.0.1", "port": p.port, "max_queue": 1} for p in (holder, other)],
            auth={"agent_secret": SECRET}, provisioning={"models": "on_demand"})
        lb.wait_ready("/lb/backends", 60)
        procs.wait_backends(lb, {holder.name, other.name})
        procs.until(lambda: all(b["agent"] for b in get(lb.url + "/lb/backends")["backends"]), "both agents found", lb)
        yield lb, holder, other
    finally:
        for p in (lb, holder, other):
            if p is not None:
                p.stop()


async def post(lb: procs.Proc, path: str, body) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(lb.url + path, json=body) as r:
            text = await r.text()
            return r.status, json.loads(text) if text else {}


def transfer(lb: procs.Proc, copy_id: str) -> dict:
    return next(t for t in get(lb.url + "/lb/transfers")["transfers"] if t["id"] == copy_id)


async def test_a_copied_model_has_the_same_sha256_is_listed_and_runs_there(cluster):
    lb, holder, other = cluster
    lacks = get(lb.url + "/lb/inventory")["backends"][other.name]["lacks"]["models"]
    assert "copy-me.safetensors" in lacks["checkpoints"]

    status, copy = await post(lb, f"/lb/backends/{other.name}/models",
                              {"folder": "checkpoints", "name": "copy-me.safetensors", "from": holder.name})
    assert status == 202, copy
    done = procs.until(lambda: transfer(lb, copy["id"])["state"] in ("done", "failed") and transfer(lb, copy["id"]),
                 "the copy to end", lb)
    want = hashlib.sha256(model_bytes("copy")).hexdigest()
    assert done["state"] == "done" and done["sha256"] == want and done["done"] == done["total"] == 3 << 20, done
    landed = other.home / "models" / "checkpoints" / "copy-me.safetensors"
    assert hashlib.sha256(landed.read_bytes()).hexdigest() == want
    assert leftovers(other) == []
    listed = get(other.url + "/object_info/ComfyLBModelProbe")["ComfyLBModelProbe"]["input"]["required"]["ckpt_name"][0]
    assert "copy-me.safetensors" in listed
    procs.until(lambda: "copy-me.safetensors" not in get(lb.url + "/lb/inventory")["backends"][other.name]["lacks"]
          ["models"].get("checkpoints", []), "the inventory to see the copy", lb)

    # routed there: with the holder disabled only the receiving peer may run it
    assert (await post(lb, f"/lb/backends/{holder.name}/disable", None))[0] == 200
    try:
        async with Client(lb.url) as c:
            run = await c.run(probe_prompt("copy-me.safetensors"))
            assert "execution_success" in run.types()
            assert run.first("executed")["output"]["text"] == [want]
        assert run.prompt_id in get(other.url + f"/history/{run.prompt_id}")
    finally:
        await post(lb, f"/lb/backends/{holder.name}/enable", None)


async def test_a_prompt_needing_a_model_only_a_busy_peer_has_is_copied_to_the_idle_one(cluster):
    lb, holder, other = cluster
    want = hashlib.sha256(model_bytes("demand")).hexdigest()
    # another client's, so ComfyLB's one-prompt-at-a-time delivery to a client does not order the two
    async with Client(lb.url) as c, Client(lb.url) as occupier:
        # the holder busy: the other peer disabled while the long prompt is dispatched
        await post(lb, f"/lb/backends/{other.name}/disable", None)
        status, body, busy = await occupier.queue(sleep_prompt(60, "busy"))
        assert status == 200, body
        await occupier.until(lambda: "execution_start" in busy.types())
        await post(lb, f"/lb/backends/{other.name}/enable", None)
        try:
            status, body, run = await c.queue(probe_prompt("on-demand.safetensors"))
            assert status == 200, body  # not refused: it waits for the copy
            await asyncio.wait_for(run.done.wait(), 120)
            assert "copied" in run.first("comfylb.waiting")["reason"]  # told why it waited, not failed
            assert "execution_success" in run.types(), run.types()
            assert run.first("executed")["output"]["text"] == [want]
            assert run.prompt_id in get(other.url + f"/history/{run.prompt_id}")
            copies = [t for t in get(lb.url + "/lb/transfers")["transfers"] if t["name"] == "on-demand.safetensors"]
            assert [(t["peer"], t["reason"], t["state"]) for t in copies] == [(other.name, "on_demand", "done")]
            assert "execution_success" not in busy.types()  # it still runs: the copy did not wait for it
        finally:
            await post(lb, "/interrupt", {})
            await c.post("/queue", {"clear": True})


async def test_a_model_only_a_disabled_peer_has_is_copied_rather_than_waited_for(cluster):
    """A holder that is disabled (or down) frees no slot however long one waits: with
    on_demand the model goes to the peer that can run the prompt."""
    lb, holder, other = cluster
    want = hashlib.sha256(model_bytes("off")).hexdigest()
    assert (await post(lb, f"/lb/backends/{holder.name}/disable", None))[0] == 200
    try:
        async with Client(lb.url) as c:
            run = await c.run(probe_prompt("holder-off.safetensors"))
            assert "execution_success" in run.types() and run.first("executed")["output"]["text"] == [want]
        assert run.prompt_id in get(other.url + f"/history/{run.prompt_id}")
    finally:
        await post(lb, f"/lb/backends/{holder.name}/enable", None)


@pytest.mark.parametrize("body, status, says", [
    ({"folder": "checkpoints", "name": "../escape.safetensors", "from": "agent_a"}, 400, ".."),
    ({"folder": "checkpoints", "name": "/etc/escape.safetensors", "from": "agent_a"}, 400, "relative"),
    ({"folder": "no_such_folder", "name": "x.safetensors", "from": "agent_a"}, 400, "no model folder"),
    ({"folder": "custom_nodes", "name": "evil.py", "from": "agent_a"}, 400, "no model folder"),
    ({"folder": "checkpoints", "name": "evil.py", "from": "agent_a"}, 400, ".py"),
    ({"folder": "checkpoints", "name": "absent.safetensors", "from": "agent_a"}, 400, "not on this peer"),
    ({"folder": "checkpoints", "name": "x.safetensors", "from": "nobody"}, 400, "no peer named"),
    ({"folder": "checkpoints", "name": "x.safetensors", "from": "agent_b"}, 400, "destination"),
    ({"folder": "checkpoints", "name": "x.safetensors", "from": "ftp://example.org/x"}, 400, "no peer named"),
    ({"folder": "checkpoints", "name": "x.safetensors"}, 400, "from"),
    ({"folder": "checkpoints", "name": "x.safetensors", "from": "agent_a", "extra": 1}, 400, "unknown"),
    ([1, 2], 400, "object"),
])
async def test_bad_copies_are_refused_and_leave_nothing(cluster, body, status, says):
    lb, holder, other = cluster
    before = sorted(os.listdir(other.home / "models" / "checkpoints"))
    got, answer = await post(lb, f"/lb/backends/{other.name}/models", body)
    assert got == status and says in answer["error"], (got, answer)
    assert sorted(os.listdir(other.home / "models" / "checkpoints")) == before


async def test_a_truncated_download_fails_clearly_and_leaves_nothing(cluster):
    """A URL that promises 2 MB and breaks off after 1 MB, every time: the copy resumes a few
    times, then fails with the reason, and no partial file stays on the peer."""
    lb, holder, other = cluster
    served = []

    async def broken(request: web.Request) -> web.StreamResponse:
        served.append(request.headers.get("Range"))
        response = web.StreamResponse(headers={"Content-Length": str(2 << 20)})
        await response.prepare(request)
        await response.write(b"\0" * (1 << 20))
        request.transport.close()  # the connection drops mid-file
        return response

    app = web.Application()
    app.router.add_get("/model.safetensors", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/model.safetensors"
        status, copy = await post(lb, f"/lb/backends/{other.name}/models",
                                  {"folder": "checkpoints", "name": "truncated.safetensors", "from": url})
        assert status == 202, copy
        ended = await asyncio.to_thread(procs.until, lambda: transfer(lb, copy["id"])["state"] in ("done", "failed")
                                        and transfer(lb, copy["id"]), "the copy to end", lb)
        assert ended["state"] == "failed" and ended["error"], ended
        assert served[0] is None and any(r and r.startswith("bytes=") for r in served[1:]), served  # it resumed
        names = os.listdir(other.home / "models" / "checkpoints")
        assert "truncated.safetensors" not in names and leftovers(other) == []
    finally:
        await runner.cleanup()
