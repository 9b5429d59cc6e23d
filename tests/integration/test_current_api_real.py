"""Today's ComfyUI API (jobs, prompt id rules, /free, node replacements) in both hosts,
against real ComfyUI peers: the standalone balancer and ComfyLB inside a coordinator
ComfyUI 0.3.75, which has no jobs API of its own."""
from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from tests.client import Client, invert_prompt, sleep_prompt
from tests.integration.test_client_api import ran_on

pytestmark = pytest.mark.real


@pytest.fixture(params=["standalone", "extension"])
def lb(request, balancer, coordinators):
    return balancer if request.param == "standalone" else coordinators["coord"]


async def peer_history(peers, prompt_id: str) -> dict:
    async with aiohttp.ClientSession() as s:
        for p in peers:
            async with s.get(f"{p.url}/history/{prompt_id}") as r:
                entry = (await r.json()).get(prompt_id)
                if entry:
                    return entry
    return {}


async def test_jobs_describe_the_cluster_and_cancel_stops_a_job_on_its_peer(lb, peers):
    async with Client(lb.url) as c:
        done = await c.run(invert_prompt("jobs"))
        _, _, long = await c.queue(sleep_prompt(30, "jobs"))
        await c.until(lambda: "execution_start" in long.types())
        for path in ("/api/jobs", "/api/api/jobs"):
            status, body = await c.get(path, params={"status": "completed,in_progress", "limit": "64"})
            assert status == 200
            states = {j["id"]: j["status"] for j in body["jobs"]}
            assert states[done.prompt_id] == "completed" and states[long.prompt_id] == "in_progress"
            assert all(isinstance(j["create_time"], (int, float)) for j in body["jobs"])
        _, detail = await c.get(f"/api/jobs/{done.prompt_id}")
        image = detail["preview_output"]
        assert detail["outputs"]["3"]["images"][0]["filename"] == image["filename"]
        assert (await c.get("/api/view", params={k: image[k] for k in ("filename", "subfolder", "type")}))[0] == 200
        assert (await c.get(f"/api/jobs/{uuid.uuid4()}"))[0] == 404
        assert (await c.get("/api/jobs", params={"status": "running"}))[0] == 400
        status, body = await c.post(f"/api/jobs/{long.prompt_id}/cancel")
        assert (status, body) == (200, {"cancelled": True})
        await asyncio.wait_for(long.done.wait(), 30)
        (host,) = await ran_on(peers, long.prompt_id)
        entry = await peer_history(peers, long.prompt_id)
        assert entry["status"]["messages"][-1][0] == "execution_interrupted", host
        _, job = await c.get(f"/api/jobs/{long.prompt_id}")
        assert job["status"] == "cancelled"


async def test_pending_jobs_cancelled_in_a_batch_never_run(lb, peers):
    async with Client(lb.url) as c:
        runs = [(await c.queue(sleep_prompt(20, "batch")))[2] for _ in range(6)]  # more than the peers hold
        await c.until(lambda: "execution_start" in runs[0].types())
        status, body = await c.post("/api/jobs/cancel", {"job_ids": ["x"]})
        assert status == 400 and body["invalid_ids"] == ["x"]
        status, body = await c.post("/api/jobs/cancel", {"job_ids": [r.prompt_id for r in runs]})
        assert (status, body) == (200, {"cancelled": True})
        await c.until(lambda: c.status[-1]["status"]["exec_info"]["queue_remaining"] == 0, timeout=60)
        never = 0
        for r in runs:
            entry = await peer_history(peers, r.prompt_id)
            if entry:
                assert entry["status"]["messages"][-1][0] == "execution_interrupted"
            else:
                never += 1
        assert never >= 2
        _, body = await c.get("/api/jobs", params={"status": "pending,in_progress"})
        assert not {j["id"] for j in body["jobs"]} & {r.prompt_id for r in runs}


async def test_prompt_id_rules(lb, peers):
    async with Client(lb.url) as c:
        status, body, _ = await c.queue(invert_prompt(), prompt_id="NOT-A-UUID")
        assert status == 400 and body["error"]["type"] == "invalid_prompt_id" and body["node_errors"] == {}
        pid = str(uuid.uuid4())
        status, _, run = await c.queue(sleep_prompt(5), prompt_id=pid)
        assert status == 200
        status, body, _ = await c.queue(sleep_prompt(5), prompt_id=pid)
        assert status == 409 and body["error"]["type"] == "duplicate_prompt_id"
        await c.post("/api/jobs/" + pid + "/cancel")
        await asyncio.wait_for(run.done.wait(), 30)
        assert len(await ran_on(peers, pid)) <= 1


async def test_free_and_node_replacements_answer(lb):
    async with Client(lb.url) as c:
        assert (await c.post("/api/free", {"unload_models": True, "free_memory": True}))[0] == 200
        status, body = await c.get("/api/node_replacements")
        assert status == 200 and isinstance(body, dict)
        _, features = await c.get("/api/features")
        assert features.get("assets") in (None, False)


async def test_a_peer_that_takes_a_prompt_at_once_gives_its_own_verdict(lb, peers):
    """A custom node's VALIDATE_INPUTS (ComfyUI's testing pack) is judged by the peer only:
    with a peer free, the client gets that peer's 400 at POST /prompt, as from ComfyUI."""
    bad = {"1": {"class_type": "TestCustomValidation1", "inputs": {"input1": "not an image", "input2": 1.0}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "verdict"}}}
    async with Client(lb.url) as c:
        _, idle = await c.get("/prompt")
        assert idle["exec_info"]["queue_remaining"] == 0
        status, body, _ = await c.queue(bad)
        assert status == 400, body
        errors = body["node_errors"]["1"]["errors"]
        assert any(e["type"] == "custom_validation_failed" and "input1" in e["details"] for e in errors), errors
        _, jobs = await c.get("/api/jobs")
        assert all(j.get("execution_error", {}).get("node_type") != "TestCustomValidation1" for j in jobs["jobs"])
        _, queue = await c.get("/queue")
        assert queue == {"queue_running": [], "queue_pending": []}


async def test_one_client_sees_its_prompts_one_at_a_time_in_queue_order(lb, peers):
    async with Client(lb.url) as c:
        arrivals: list[str] = []
        handle = c._handle

        async def record(msg):
            await handle(msg)
            if msg.type == aiohttp.WSMsgType.TEXT and c._last_pid and (not arrivals or arrivals[-1] != c._last_pid):
                arrivals.append(c._last_pid)
        c._handle = record
        _, _, slow = await c.queue(sleep_prompt(2.0, "ordered"))
        _, _, fast = await c.queue(sleep_prompt(0.1, "ordered"))
        await asyncio.wait_for(asyncio.gather(slow.done.wait(), fast.done.wait()), 60)
        (slow_host,), (fast_host,) = await ran_on(peers, slow.prompt_id), await ran_on(peers, fast.prompt_id)
        assert slow_host != fast_host  # they did run side by side
        fast_ended = (await peer_history(peers, fast.prompt_id))["status"]["messages"][-1][1]["timestamp"]
        slow_ended = (await peer_history(peers, slow.prompt_id))["status"]["messages"][-1][1]["timestamp"]
        assert fast_ended < slow_ended
        assert arrivals == [slow.prompt_id, fast.prompt_id]  # yet the client saw them in queue order


async def test_interrupt_without_a_prompt_id_stops_one_prompt_not_every_peer(lb, peers):
    async with Client(lb.url) as first_client, Client(lb.url) as other:
        _, _, first = await first_client.queue(sleep_prompt(30, "intr"))
        await first_client.until(lambda: "execution_start" in first.types())
        _, _, second = await other.queue(sleep_prompt(30, "intr"))
        await other.until(lambda: "execution_start" in second.types())
        assert (await other.post("/interrupt"))[0] == 200
        await asyncio.wait_for(first.done.wait(), 30)
        assert "execution_interrupted" in first.types()
        _, job = await other.get(f"/api/jobs/{second.prompt_id}")
        assert job["status"] == "in_progress"
        await other.post(f"/api/jobs/{second.prompt_id}/cancel")
        await asyncio.wait_for(second.done.wait(), 30)


async def test_a_value_out_of_range_is_refused_as_the_peer_refuses_it(lb, peers):
    prompt = invert_prompt()
    prompt["1"]["inputs"]["width"] = 1 << 20
    async with Client(lb.url) as c:
        status, body, _ = await c.queue(prompt)
        async with aiohttp.ClientSession() as s:
            async with s.post(peers[0].url + "/prompt", json={"prompt": prompt}) as r:
                assert (status, body) == (r.status, await r.json()) and status == 400


async def test_the_balancer_itself_is_never_its_own_peer(lb):
    async with Client(lb.url) as c:
        status, body = await c.post("/lb/backends", {"name": "myself", "host": "127.0.0.1", "port": lb.port})
        assert status == 400 and "this ComfyLB itself" in body["error"], body
        _, backends = await c.get("/lb/backends")
        assert "myself" not in {b["name"] for b in backends["backends"] if b["status"] != "removed"}
