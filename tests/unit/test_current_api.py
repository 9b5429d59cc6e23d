"""Today's ComfyUI API over simulated peers: the jobs API, the /prompt id rules, interrupt
without a prompt id, and ordered delivery to one client."""
import asyncio
import uuid

from tests.client import Client, sleep_prompt
from tests.peers import hostile_peer
from tests.simcluster import lb_over_sims, wait_for


async def test_jobs_list_every_state_with_create_time_and_detail():
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            done = await c.run(sleep_prompt(0.01))
            _, _, running = await c.queue(sleep_prompt(5))
            _, _, pending = await c.queue(sleep_prompt(5))
            await c.until(lambda: "execution_start" in running.types())
            status, body = await c.get("/api/jobs", params={"limit": "10", "offset": "0"})
            assert status == 200
            states = {j["id"]: j["status"] for j in body["jobs"]}
            assert states == {done.prompt_id: "completed", running.prompt_id: "in_progress",
                              pending.prompt_id: "pending"}
            assert all(isinstance(j["create_time"], int) for j in body["jobs"])
            assert body["pagination"] == {"offset": 0, "limit": 10, "total": 3, "has_more": False}
            _, body = await c.get("/api/jobs", params={"status": "in_progress,pending", "limit": "200"})
            assert [j["id"] for j in body["jobs"]] == [pending.prompt_id, running.prompt_id]  # newest first
            _, detail = await c.get(f"/api/jobs/{done.prompt_id}")
            assert detail["status"] == "completed" and detail["outputs"]["3"]["images"]
            assert detail["workflow"]["prompt"]["2"]["class_type"] == "TestSleep"
            assert detail["preview_output"]["filename"].endswith(".png")
            assert (await c.get(f"/api/jobs/{uuid.uuid4()}"))[0] == 404
            assert (await c.get(f"/api/jobs/{pending.prompt_id}"))[1]["status"] == "pending"
            assert (await c.get("/api/api/jobs"))[0] == 200  # ComfyUI's twin of an /api route
            for bad in ({"status": "bogus"}, {"limit": "0"}, {"limit": "x"}, {"sort_by": "name"},
                        {"sort_order": "up"}, {"offset": "x"}):
                status, body = await c.get("/api/jobs", params=bad)
                assert status == 400 and isinstance(body["error"], str), (bad, body)
            await c.post("/queue", {"clear": True})
            await c.post("/interrupt", {"prompt_id": running.prompt_id})


async def test_cancel_a_pending_job_never_runs_and_a_running_one_stops_on_its_peer():
    async with lb_over_sims(1, max_queue=2) as (url, sims, cluster):
        sim = sims[0].sim
        async with Client(url) as c:
            _, _, running = await c.queue(sleep_prompt(30))
            _, _, on_peer = await c.queue(sleep_prompt(30))     # waits in the peer's own queue
            _, _, here = await c.queue(sleep_prompt(30))        # waits in the coordinator
            await c.until(lambda: "execution_start" in running.types())
            assert (await c.post(f"/api/jobs/{here.prompt_id}/cancel"))[1] == {"cancelled": True}
            assert (await c.post(f"/api/jobs/{on_peer.prompt_id}/cancel"))[1] == {"cancelled": True}
            assert (await c.post(f"/api/jobs/{running.prompt_id}/cancel"))[1] == {"cancelled": True}
            await asyncio.wait_for(running.done.wait(), 10)
            assert running.types()[-2] == "execution_interrupted"
            assert sim.executed == [running.prompt_id]          # the other two never ran
            _, body = await c.get("/api/jobs")
            assert {j["id"]: j["status"] for j in body["jobs"]} == {running.prompt_id: "cancelled"}
            assert (await c.post(f"/api/jobs/{running.prompt_id}/cancel"))[1] == {"cancelled": False}
            assert (await c.post(f"/api/jobs/{uuid.uuid4()}/cancel"))[1] == {"cancelled": False}


async def test_batch_cancel_refuses_bad_ids_and_cancels_nothing():
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            _, _, a = await c.queue(sleep_prompt(30))
            _, _, b = await c.queue(sleep_prompt(30))
            status, body = await c.post("/api/jobs/cancel", {"job_ids": [b.prompt_id, "nope"]})
            assert status == 400 and body["invalid_ids"] == ["nope"]
            assert b.prompt_id in cluster.tasks
            for raw in (b"", b"{", b"[1"):
                async with c.session.post(url + "/api/jobs/cancel", data=raw) as r:
                    assert r.status == 400 and (await r.json()) == {"error": "Request body must be valid JSON"}
            assert (await c.post("/api/jobs/cancel", {"job_ids": "x"}))[0] == 400
            status, body = await c.post("/api/jobs/cancel", {"job_ids": [a.prompt_id, b.prompt_id]})
            assert (status, body) == (200, {"cancelled": True})
            await wait_for(lambda: not cluster.tasks, cluster)


async def test_prompt_id_must_be_canonical_and_a_live_one_is_a_conflict():
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            pid = str(uuid.uuid4())
            for bad in (pid.upper(), "{" + pid + "}", "urn:uuid:" + pid, pid.replace("-", ""), f" {pid}", 5,
                        "../../manager/reboot?"):
                status, body, _ = await c.queue(sleep_prompt(0.01), prompt_id=bad)
                assert status == 400 and body["error"]["type"] == "invalid_prompt_id", bad
            status, body, run = await c.queue(sleep_prompt(5), prompt_id=pid)
            assert (status, body["prompt_id"]) == (200, pid)
            status, body, _ = await c.queue(sleep_prompt(5), prompt_id=pid)
            assert status == 409 and body["error"]["type"] == "duplicate_prompt_id"
            await c.post("/interrupt", {"prompt_id": pid})
            await asyncio.wait_for(run.done.wait(), 10)
            status, _, again = await c.queue(sleep_prompt(0.01), prompt_id=pid)  # finished: reusable
            assert status == 200
            await asyncio.wait_for(again.done.wait(), 10)


async def test_interrupt_without_id_stops_only_the_prompt_queued_first():
    async with lb_over_sims(2, max_queue=1) as (url, sims, cluster):
        async with Client(url) as mine, Client(url) as other:
            _, _, first = await mine.queue(sleep_prompt(30))
            _, _, second = await other.queue(sleep_prompt(30))
            await mine.until(lambda: "execution_start" in first.types())
            await other.until(lambda: "execution_start" in second.types())
            assert (await mine.post("/interrupt"))[0] == 200
            await asyncio.wait_for(first.done.wait(), 10)
            assert "execution_interrupted" in first.types()
            assert cluster.tasks[second.prompt_id].state == "running"
            await other.post(f"/api/jobs/{second.prompt_id}/cancel")
            await asyncio.wait_for(second.done.wait(), 10)


async def test_one_client_sees_one_prompt_at_a_time_in_queue_order():
    async with lb_over_sims(2, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            order = []
            seen = c._handle

            async def record(msg):
                await seen(msg)
                if msg.type.name == "TEXT":
                    data = __import__("json").loads(msg.data)
                    pid = (data.get("data") or {}).get("prompt_id") if isinstance(data.get("data"), dict) else None
                    if pid:
                        order.append(pid)
            c._handle = record
            _, _, slow = await c.queue(sleep_prompt(0.6))
            _, _, fast = await c.queue(sleep_prompt(0.01))      # runs at once on the other peer
            await asyncio.wait_for(asyncio.gather(slow.done.wait(), fast.done.wait()), 20)
            assert sorted(sims[0].sim.executed + sims[1].sim.executed) == sorted([slow.prompt_id, fast.prompt_id])
            switch = order.index(fast.prompt_id)
            assert set(order[:switch]) == {slow.prompt_id} and set(order[switch:]) == {fast.prompt_id}
            assert slow.messages[-1][0] == "executing" and fast.messages[-1][0] == "executing"


async def test_a_client_that_opts_in_gets_prompts_interleaved():
    async with lb_over_sims(2, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            await c.ws.send_json({"type": "feature_flags", "data": {"comfylb_interleave": True}})
            await c.until(lambda: c.feature_reply is not None)
            _, _, slow = await c.queue(sleep_prompt(5))
            _, _, fast = await c.queue(sleep_prompt(0.01))
            await asyncio.wait_for(fast.done.wait(), 10)         # not held behind the slow one
            assert not slow.done.is_set()
            await c.post(f"/api/jobs/{slow.prompt_id}/cancel")
            await asyncio.wait_for(slow.done.wait(), 10)


async def test_peer_local_asset_ids_never_reach_clients():
    async with lb_over_sims(1, sim_kw=[{"asset_ids": True}]) as (url, sims, cluster):
        async with Client(url) as c:
            run = await c.run(sleep_prompt(0.01))
            direct = sims[0].sim.history[run.prompt_id]["outputs"]["3"]["images"][0]
            assert "id" in direct  # the peer did add them
            image = run.first("executed")["output"]["images"][0]
            _, hist = await c.get(f"/history/{run.prompt_id}")
            _, job = await c.get(f"/api/jobs/{run.prompt_id}")
            for item in (image, hist[run.prompt_id]["outputs"]["3"]["images"][0], job["outputs"]["3"]["images"][0],
                         job["preview_output"]):
                assert "id" not in item and "preview_id" not in item, item


async def test_free_reaches_every_peer_and_settings_are_forwarded_to_one():
    async with lb_over_sims(2) as (url, sims, cluster):
        async with Client(url) as c:
            for s in sims:
                s.sim.loaded_model = "sim-a.safetensors"
            assert (await c.post("/free", {"unload_models": True}))[0] == 200
            await wait_for(lambda: all(s.sim.loaded_model is None for s in sims), cluster, *(s.sim for s in sims))
            assert (await c.post("/free", [1]))[0] == 400
            assert (await c.post("/api/settings", {"Comfy.Locale": "de"}))[0] == 200
            assert (await c.get("/api/settings/Comfy.Locale")) == (200, "de")
            assert sims[0].sim.settings == {"Comfy.Locale": "de"} and sims[1].sim.settings == {}
            assert (await c.get("/api/no/such/route"))[0] == 404
            _, features = await c.get("/features")
            assert features["assets"] is False and features["supports_preview_metadata"] is True


REPLACE = {"OldInvert": [{"new_node_id": "ImageInvert", "old_node_id": "OldInvert", "old_widget_ids": None,
                          "input_mapping": [{"new_id": "image", "old_id": "picture"}], "output_mapping": None}]}


async def test_a_deprecated_node_the_peers_replace_is_accepted_and_runs_replaced():
    async with lb_over_sims(1, sim_kw=[{"replacements": REPLACE}]) as (url, sims, cluster):
        async with Client(url) as c:
            prompt = sleep_prompt(0.01)
            prompt["2"] = {"class_type": "OldInvert", "inputs": {"picture": ["1", 0]}}
            run = await c.run(prompt)
            assert "execution_success" in run.types(), run.messages
            ran = sims[0].sim.history[run.prompt_id]["prompt"][2]
            assert ran["2"] == {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
            assert (await c.get("/node_replacements")) == (200, REPLACE)


async def test_object_info_answers_while_a_peer_never_does():
    """The newest web UI gives up on a request after 60 s: a peer that never answers
    /object_info must not hold the cluster's answer."""
    async def hang(request):
        await asyncio.Event().wait()

    async with hostile_peer({("GET", "/object_info"): hang, ("GET", "/node_replacements"): hang}) as (port, _):
        async with lb_over_sims(1) as (url, sims, cluster):
            from comfylb_ext.config import BackendConfig
            cluster.add_peer(BackendConfig(name="stuck", port=port))
            await wait_for(lambda: cluster.peers["stuck"].available, cluster)
            cluster.catalog.invalidate()
            for p in cluster.peers.values():
                p.object_info = None  # as after a restart: nothing known yet
            async with Client(url) as c:
                status, info = await asyncio.wait_for(c.get("/object_info"), 30)
                assert status == 200 and "EmptyImage" in info
