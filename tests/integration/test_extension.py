"""ComfyLB inside a real coordinator ComfyUI (this repo in its custom_nodes/), with real peers."""
from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from tests import procs
from tests.client import Client, invert_prompt, sleep_prompt
from tests.integration.test_client_api import ran_on

pytestmark = pytest.mark.real


def outputs_on_disk(proc: procs.Proc) -> list[str]:
    out = proc.home / "output"
    return sorted(p.name for p in out.rglob("*.png")) if out.exists() else []


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_prompts_to_the_coordinator_run_on_peers(coordinators, peers, prefix):
    coord = coordinators["coord"]
    async with Client(coord.url, flags=True) as c:
        queued = [await c.queue(sleep_prompt(0.5, "ext"), prefix=prefix) for _ in range(4)]
        runs = [r for _, _, r in queued]
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 120)
        hosts = set()
        for run in runs:
            assert run.types()[0] == "execution_start" and "execution_success" in run.types()
            assert run.messages[-1] == ("executing", {"node": None, "prompt_id": run.prompt_id})
            (host,) = await ran_on(peers, run.prompt_id)
            hosts.add(host)
            _, hist = await c.get(f"{prefix}/history/{run.prompt_id}")
            image = hist[run.prompt_id]["outputs"]["3"]["images"][0]
            status, via = await c.get(f"{prefix}/view", params=image)
            async with aiohttp.ClientSession() as s:
                async with s.get(next(p for p in peers if p.name == host).url + "/view", params=image) as r:
                    assert status == 200 and via == await r.read()
        assert hosts == {peers[0].name, peers[1].name}
        assert outputs_on_disk(coord) == []  # nothing rendered on the coordinator
        _, info = await c.get(f"{prefix}/prompt")
        assert info == {"exec_info": {"queue_remaining": 0}}


async def test_coordinator_queue_history_and_status_are_cluster_wide(coordinators):
    coord = coordinators["coord"]
    async with Client(coord.url) as c:
        runs = [(await c.queue(sleep_prompt(1.0)))[2] for _ in range(3)]
        _, q = await c.get("/api/queue")
        assert len(q["queue_running"]) + len(q["queue_pending"]) == 3
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 60)
        remaining = [s["status"]["exec_info"]["queue_remaining"] for s in c.status]
        assert max(remaining) >= 2  # status broadcasts counted the cluster, not the idle coordinator
        _, hist = await c.get("/api/history", params={"max_items": "3"})
        numbers = [e["prompt"][0] for e in hist.values()]
        assert numbers == sorted(numbers) and set(hist) == {r.prompt_id for r in runs}


async def test_upload_to_the_coordinator_reaches_the_peer(coordinators, peers):
    coord = coordinators["coord"]
    name = f"ext-{uuid.uuid4().hex[:8]}.png"
    async with Client(coord.url) as c:
        form = aiohttp.FormData()
        form.add_field("image", (procs.DATA / "upload_test.png").read_bytes(), filename=name)
        status, body = await c.post("/api/upload/image", data=form)
        assert status == 200 and body["name"] == name
        prompt = procs.load_workflow("loadimage.json")
        prompt["1"]["inputs"]["image"] = name
        run = await c.run(prompt)
        assert "execution_success" in run.types(), run.messages
        assert len(await ran_on(peers, run.prompt_id)) == 1


async def test_routing_node_by_name_and_tag(coordinators, peers):
    coord = coordinators["coord"]
    async with Client(coord.url) as c:
        for target, want in ((peers[1].name, peers[1].name), ("gpu24", peers[0].name)):
            prompt = invert_prompt() | {"99": {"class_type": "ComfyLBRoute", "inputs": {"target": target}}}
            run = await c.run(prompt)
            assert await ran_on(peers, run.prompt_id) == [want]
            _, hist = await c.get(f"/history/{run.prompt_id}")
            assert "99" not in hist[run.prompt_id]["prompt"][2]  # stripped before dispatch
        prompt = invert_prompt() | {"99": {"class_type": "ComfyLBRoute", "inputs": {"target": "gpu48"}}}
        status, body = await c.post("/prompt", {"prompt": prompt})
        assert status == 400 and body["error"]["message"] == "No peer can run this prompt"
        assert body["node_errors"]["99"]["class_type"] == "ComfyLBRoute"
        assert "gpu48" in body["node_errors"]["99"]["errors"][0]["details"]
        _, info = await c.get("/object_info/ComfyLBRoute")
        assert info["ComfyLBRoute"]["category"] == "ComfyLB"


async def test_lb_api_on_the_coordinator(coordinators, peers):
    coord = coordinators["coord"]
    async with Client(coord.url) as c:
        for prefix in ("", "/api"):
            status, body = await c.get(f"{prefix}/lb/backends")
            assert status == 200 and {b["name"] for b in body["backends"]} == {peers[0].name, peers[1].name}
        _, stats = await c.get("/system_stats")
        assert {d["peer"] for d in stats["devices"]} == {peers[0].name, peers[1].name}


async def test_local_enabled_shares_the_work(coordinators, peers):
    coord = coordinators["coord_local"]
    async with Client(coord.url) as c:
        runs = [(await c.queue(sleep_prompt(1.0, "loc")))[2] for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 60)
        assert all("execution_success" in r.types() for r in runs)
        remote = [await ran_on([peers[2]], r.prompt_id) for r in runs]
        assert sorted(map(len, remote)) == [0, 1]   # one on the peer, one on the coordinator itself
        assert len(outputs_on_disk(coord)) == 1
        for run, elsewhere in zip(runs, remote):
            image = run.first("executed")["output"]["images"][0]
            holder = (peers[2].home if elsewhere else coord.home) / "output" / image["subfolder"] / image["filename"]
            assert await c.get("/view", params=image) == (200, holder.read_bytes())
        # the coordinator's own image is served by its ComfyUI, never copied beside itself
        assert not (coord.home.parent / "coord_local-data" / "view-cache" / "local").exists()


async def test_without_config_comfyui_is_stock(coordinators):
    stock = coordinators["stock"]
    text = stock.log.read_text()
    assert "ComfyLB: no config at" in text
    loaded = [line for line in text.splitlines() if line.rstrip().endswith("custom_nodes/comfylb")]
    assert loaded and "IMPORT FAILED" not in loaded[0]
    async with Client(stock.url) as c:
        run = await c.run(invert_prompt("stock"))
        assert "execution_success" in run.types()
        assert outputs_on_disk(stock)
        _, info = await c.get("/object_info/ComfyLBRoute")
        assert "ComfyLBRoute" in info
        assert (await c.get("/lb/backends"))[0] == 404
