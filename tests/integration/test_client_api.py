"""ComfyUI's client API through the standalone balancer, against real ComfyUI peers."""
from __future__ import annotations

import asyncio
import json
import struct
import uuid

import aiohttp
import pytest

from tests.client import Client, invert_prompt, sleep_prompt
from tests.procs import WORKFLOWS, load_workflow

pytestmark = pytest.mark.real


async def ran_on(peers, prompt_id: str) -> list[str]:
    """Which peers ran a prompt, from each peer's own history (no coordinator code involved)."""
    names = []
    async with aiohttp.ClientSession() as s:
        for p in peers:
            async with s.get(f"{p.url}/history/{prompt_id}") as r:
                if prompt_id in await r.json():
                    names.append(p.name)
    return names


async def test_burst_spreads_over_both_peers_and_every_prompt_completes(balancer, peers):
    async with Client(balancer.url) as c:
        prompts = [sleep_prompt(0.5) for _ in range(6)]
        queued = [await c.queue(p) for p in prompts]
        assert all(status == 200 for status, _, _ in queued)
        runs = [run for _, _, run in queued]
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 120)
        where = {}
        for run in runs:
            types = run.types()
            assert types[0] == "execution_start", types
            assert "execution_success" in types
            assert types[-1] == "executing" and run.messages[-1][1]["node"] is None
            assert any(t == "progress" for t in types)
            hosts = await ran_on(peers, run.prompt_id)
            assert len(hosts) == 1, hosts  # ran exactly once
            where[run.prompt_id] = hosts[0]
        assert set(where.values()) == {peers[0].name, peers[1].name}


async def test_view_is_byte_identical_to_the_peers_file(balancer, peers):
    async with Client(balancer.url) as c:
        run = await c.run(invert_prompt("viewtest"))
        image = run.first("executed")["output"]["images"][0]
        params = {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}
        status, via_lb = await c.get("/view", params=params)
        assert status == 200 and via_lb[:8] == b"\x89PNG\r\n\x1a\n"
        (host,) = await ran_on(peers, run.prompt_id)
        peer = next(p for p in peers if p.name == host)
        async with aiohttp.ClientSession() as s:
            async with s.get(peer.url + "/view", params=params) as r:
                direct = await r.read()
        assert via_lb == direct
        status, twin = await c.get("/api/view", params=params)
        assert twin == direct
        status, _ = await c.get("/view", params={"filename": "nobody_made_this.png", "type": "output"})
        assert status == 404
        status, _ = await c.get("/view", params={"filename": "../etc/passwd"})
        assert status == 400


async def test_a_prompt_sent_again_is_served_from_the_peers_cache(balancer, peers):
    async with Client(balancer.url) as c:
        prompt = invert_prompt("again")
        first = await c.run(prompt)
        again = await c.run(prompt)  # both peers idle: it goes back to where its nodes are cached
        assert sorted(again.first("execution_cached")["nodes"]) == sorted(prompt)
        assert await ran_on(peers, first.prompt_id) == await ran_on(peers, again.prompt_id)


async def test_history_entry_as_comfyui_writes_it(balancer):
    async with Client(balancer.url) as c:
        run = await c.run(invert_prompt())
        status, hist = await c.get(f"/history/{run.prompt_id}")
        entry = hist[run.prompt_id]
        number, pid, graph, extra, outputs = entry["prompt"]
        assert pid == run.prompt_id and extra["client_id"] == c.client_id and outputs == ["3"]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]][0] == "execution_start"
        assert entry["outputs"]["3"]["images"][0]["filename"].startswith("lbtest")
        assert "3" in entry["meta"]
        _, twin = await c.get(f"/api/history/{run.prompt_id}")
        assert twin == hist
        _, missing = await c.get(f"/history/{uuid.uuid4()}")
        assert missing == {}


async def test_history_numbers_follow_completion_order(balancer):
    async with Client(balancer.url) as c:
        slow = await c.queue(sleep_prompt(2.0))
        fast = await c.queue(sleep_prompt(0.1))
        await asyncio.wait_for(asyncio.gather(slow[2].done.wait(), fast[2].done.wait()), 60)
        _, hist = await c.get("/history", params={"max_items": "50"})
        order = list(hist)
        assert order.index(fast[1]["prompt_id"]) < order.index(slow[1]["prompt_id"])
        assert hist[fast[1]["prompt_id"]]["prompt"][0] < hist[slow[1]["prompt_id"]]["prompt"][0]
        numbers = [e["prompt"][0] for e in hist.values()]
        assert numbers == sorted(numbers)
        _, last = await c.get("/history", params={"max_items": "1"})
        assert list(last) == [order[-1]]
        _, paged = await c.get("/history", params={"max_items": "1", "offset": "0"})
        assert len(paged) == 1


async def test_client_prompt_id_is_kept_end_to_end(balancer, peers):
    async with Client(balancer.url) as c:
        pid = str(uuid.uuid4())
        run = await c.run(invert_prompt(), prompt_id=pid)
        assert run.prompt_id == pid
        assert all(d.get("prompt_id") == pid for _, d in run.messages)
        assert len(await ran_on(peers, pid)) == 1


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_invalid_prompts_get_the_peers_own_400(balancer, peers, prefix):
    cases = [
        {"1": {"class_type": "NoSuchNode", "inputs": {}}},
        {"1": {"inputs": {}}},
        {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}},
        {"1": {"class_type": "ImageInvert", "inputs": {}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}},
        {"2": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}},
    ]
    async with Client(balancer.url) as c:
        for prompt in cases:
            s_lb, body_lb = await c.post(f"{prefix}/prompt", {"prompt": prompt})
            async with aiohttp.ClientSession() as s:
                async with s.post(peers[0].url + "/prompt", json={"prompt": prompt}) as r:
                    s_peer, body_peer = r.status, await r.json()
            assert (s_lb, _strip_tb(body_lb)) == (s_peer, _strip_tb(body_peer)), prompt
        s, body = await c.post(f"{prefix}/prompt", {"no": "prompt"})
        assert s == 400 and body["error"]["type"] == "no_prompt"
        async with c.session.post(c.base + f"{prefix}/prompt", data=b"{not json") as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_prompt"


def _strip_tb(body):
    for ne in body.get("node_errors", {}).values():
        for e in ne["errors"]:
            e.get("extra_info", {}).pop("traceback", None)
    return body


async def test_values_are_refused_at_submit_exactly_as_comfyui_refuses_them(balancer, peers):
    """A LoadImage of a file nobody has, a number out of range, a combo value not in its
    list: ComfyLB answers the 400 a ComfyUI peer answers, body for body."""
    missing = load_workflow("loadimage.json")
    missing["1"]["inputs"]["image"] = f"missing-{uuid.uuid4().hex}.png"
    too_big = invert_prompt()
    too_big["1"]["inputs"]["width"] = 1 << 20
    combo = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nope", "width": 8,
                                                          "height": 8, "crop": "disabled"}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    async with Client(balancer.url) as c:
        for prompt in (missing, too_big, combo):
            status, body, _ = await c.queue(prompt)
            async with aiohttp.ClientSession() as s:
                async with s.post(peers[0].url + "/prompt", json={"prompt": prompt}) as r:
                    assert (status, body) == (r.status, await r.json())
            assert status == 400 and body["node_errors"]


async def test_upload_feeds_loadimage_on_whichever_peer_runs_it(balancer, peers):
    data = (WORKFLOWS / "upload_test.png").read_bytes()
    name = f"up-{uuid.uuid4().hex[:8]}.png"
    async with Client(balancer.url) as c:
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name)
        status, body = await c.post("/upload/image", data=form)
        assert (status, body) == (200, {"name": name, "subfolder": "", "type": "input"})
        # Same bytes again: same name; different bytes: renamed like ComfyUI does.
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name)
        assert (await c.post("/api/upload/image", data=form))[1]["name"] == name
        form = aiohttp.FormData()
        form.add_field("image", data + b"x", filename=name)
        assert (await c.post("/upload/image", data=form))[1]["name"] == name.replace(".png", " (1).png")
        status, served = await c.get("/view", params={"filename": name, "type": "input"})
        assert status == 200 and served == data
        # Hold both peers with one long prompt each, then LoadImage prompts land on both.
        prompts = []
        for _ in range(2):
            p = load_workflow("loadimage.json")
            p["1"]["inputs"]["image"] = name
            p["2"] = {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": 1.0}}
            p["3"]["inputs"]["images"] = ["2", 0]
            prompts.append(p)
        runs = await asyncio.gather(*(c.run(p) for p in prompts))
        hosts = set()
        for run in runs:
            assert "execution_success" in run.types(), run.messages
            hosts.update(await ran_on(peers, run.prompt_id))
        assert hosts == {peers[0].name, peers[1].name}


async def test_queue_delete_clear_and_interrupt(balancer):
    async with Client(balancer.url) as c:
        # Two peers x max_queue 2 = 4 held on peers; the rest wait in the coordinator.
        queued = [await c.queue(sleep_prompt(3.0)) for _ in range(7)]
        ids = [b["prompt_id"] for _, b, _ in queued]
        status, q = await c.get("/queue")
        assert set(q) == {"queue_running", "queue_pending"}
        listed = [item[1] for item in q["queue_running"] + q["queue_pending"]]
        assert set(ids) <= set(listed)
        item = q["queue_pending"][-1]
        assert len(item) == 5 and item[3]["client_id"] == c.client_id
        _, info = await c.get("/prompt")
        assert info["exec_info"]["queue_remaining"] >= 7
        # delete the last (still in the coordinator) and one held on a peer
        status, _ = await c.post("/queue", {"delete": [ids[-1]]})
        assert status == 200
        _, q = await c.get("/api/queue")
        assert ids[-1] not in [i[1] for i in q["queue_pending"]]
        # interrupt the running ones by id, then clear whatever still waits
        _, q = await c.get("/queue")
        for item in q["queue_running"]:
            assert (await c.post("/interrupt", {"prompt_id": item[1]}))[0] == 200
        assert (await c.post("/queue", {"clear": True}))[0] == 200
        interrupted = [r for _, _, r in queued if r is not None]
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in interrupted[:2])), 60)
        assert any("execution_interrupted" in r.types() for r in interrupted[:2])
        # everything settles: the status ComfyUI clients watch says so, and so does /queue
        await c.until(lambda: c.status[-1]["status"]["exec_info"]["queue_remaining"] == 0)
        _, q = await c.get("/queue")
        assert q == {"queue_running": [], "queue_pending": []}
        _, hist = await c.get(f"/history/{ids[-1]}")
        assert hist == {}


async def test_websocket_hello_flags_and_previews(balancer):
    async with Client(balancer.url, flags=True) as c:
        assert c.hello["sid"] == c.client_id and "queue_remaining" in c.hello["status"]["exec_info"]
        run = await c.run(load_workflow("ws_save.json") | {"1": {"class_type": "EmptyImage", "inputs": {
            "width": 16, "height": 16, "batch_size": 2, "color": 77}}})
        assert c.feature_reply["supports_preview_metadata"] is True
        assert run.binary and all(struct.unpack(">I", b[:4])[0] == 4 for b in run.binary)
        (n,) = struct.unpack(">I", run.binary[0][4:8])
        assert json.loads(run.binary[0][8:8 + n])["prompt_id"] == run.prompt_id
    async with Client(balancer.url) as legacy:
        run = await legacy.run(load_workflow("ws_save.json") | {"1": {"class_type": "EmptyImage", "inputs": {
            "width": 16, "height": 16, "batch_size": 2, "color": 78}}})
        assert run.binary and all(b[:8] == struct.pack(">II", 1, 2) for b in run.binary)


async def test_reconnect_with_same_client_id_keeps_receiving(balancer):
    cid = uuid.uuid4().hex
    async with Client(balancer.url, client_id=cid) as first:
        async with Client(balancer.url, client_id=cid) as second:
            await first.ws.close()  # the old socket goes away after the new one arrived
            run = await second.run(invert_prompt())
            assert run.types()[-1] == "executing"


async def test_node_info_models_and_system_stats(balancer, peers):
    async with Client(balancer.url) as c, aiohttp.ClientSession() as s:
        async with s.get(peers[0].url + "/object_info/SaveImage") as r:
            direct = await r.json()
        assert (await c.get("/object_info/SaveImage"))[1] == direct
        assert (await c.get("/api/object_info/SaveImage"))[1] == direct
        _, full = await c.get("/object_info")
        assert "TestSleep" in full and "EmptyImage" in full
        for path in ("/embeddings", "/extensions", "/models"):
            status, body = await c.get(path)
            assert status == 200 and isinstance(body, list), path
        _, models = await c.get("/models")
        assert "checkpoints" in models
        assert (await c.get("/models/checkpoints"))[0] == 200
        assert (await c.get("/models/no_such_folder"))[0] == 404
        _, feats = await c.get("/features")
        assert feats["supports_preview_metadata"] is True and feats["max_upload_size"] > 0
        _, stats = await c.get("/system_stats")
        assert {d["peer"] for d in stats["devices"]} == {peers[0].name, peers[1].name}
        assert stats["system"]["comfyui_version"]
