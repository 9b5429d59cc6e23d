"""Coordinator logic over simulated peers (fast; the real-peer tests cover the protocol)."""
import asyncio

import pytest

from tests.client import Client, invert_prompt, sleep_prompt
from tests.simcluster import lb_over_sims, sim_backends, start_balancer, wait_for


async def test_queue_full_answers_503_in_comfyuis_error_shape():
    async with lb_over_sims(1, queue={"max_size": 2}) as (url, sims, cluster):
        async with Client(url) as c:
            statuses = [(await c.queue(sleep_prompt(5)))[0] for _ in range(3)]  # 1 on the peer, 2 waiting
            status, body, _ = await c.queue(sleep_prompt(5))
            assert statuses == [200, 200, 200]
            assert status == 503 and body["error"]["type"] == "queue_full" and body["node_errors"] == {}
            await c.post("/queue", {"clear": True})
            await c.post("/interrupt", {})


async def test_completion_sends_the_next_prompt_at_once_and_max_queue_holds():
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        sim = sims[0].sim
        depth = []
        orig = sim.status

        async def spy():
            depth.append(sim.remaining())
            await orig()
        sim.status = spy
        async with Client(url) as c:
            runs = [(await c.queue(sleep_prompt(0.05)))[2] for _ in range(4)]
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 20)
        assert max(depth) == 1  # never more than max_queue on the peer
        assert all("execution_success" in r.types() for r in runs)


async def test_lost_peer_mid_job_is_retried_elsewhere_with_one_result():
    async with lb_over_sims(2, queue={"retry_interval": 0.05}) as (url, sims, cluster):
        async with Client(url) as c:
            _, body, run = await c.queue(sleep_prompt(1.0))
            pid = body["prompt_id"]
            await c.until(lambda: "execution_start" in run.types())
            victim = next(s for s in sims if s.sim.running and s.sim.running[1] == pid)
            survivor = next(s for s in sims if s is not victim)
            await victim.stop()
            await asyncio.wait_for(run.done.wait(), 20)
            assert run.types().count("execution_success") == 1
            assert run.types().count("executing") - sum(
                1 for t, d in run.messages if t == "executing" and d["node"] is not None) == 1
            assert pid in survivor.sim.history
            _, hist = await c.get(f"/history/{pid}")
            assert hist[pid]["status"]["status_str"] == "success"
            assert cluster.counts["retried"] == 1


async def test_poison_prompt_fails_after_max_retries():
    async with lb_over_sims(1, queue={"retry_interval": 0.05, "max_retries": 0}) as (url, sims, cluster):
        async with Client(url) as c:
            _, body, run = await c.queue(sleep_prompt(1.0))
            await c.until(lambda: "execution_start" in run.types())
            await sims[0].stop()
            await asyncio.wait_for(run.done.wait(), 20)
            err = run.first("execution_error")
            assert err["exception_type"] == "comfylb.PeerLost" and "gave up after 1 attempts" in err["exception_message"]
            _, hist = await c.get(f"/history/{body['prompt_id']}")
            assert hist[body["prompt_id"]]["status"]["status_str"] == "error"


async def test_a_poison_prompt_takes_down_at_most_two_peers_by_default():
    async with lb_over_sims(3, queue={"retry_interval": 0.05}) as (url, sims, cluster):
        killed = []

        async def kill_whoever_runs_it():  # each peer that starts it dies
            while True:
                await wait_for(lambda: any(s.sim.running for s in sims if s not in killed), *(s.sim for s in sims))
                victim = next(s for s in sims if s.sim.running and s not in killed)
                killed.append(victim)
                await victim.stop()
        async with Client(url) as c:
            _, body, run = await c.queue(sleep_prompt(5.0))
            killer = asyncio.create_task(kill_whoever_runs_it())
            try:
                await asyncio.wait_for(run.done.wait(), 20)
            finally:
                killer.cancel()
            err = run.first("execution_error")
            assert err["exception_type"] == "comfylb.PeerLost" and "gave up after 2 attempts" in err["exception_message"]
            assert len(killed) == 2  # the third peer never got it


async def test_delete_reaches_prompts_waiting_on_a_peer():
    async with lb_over_sims(1, max_queue=3) as (url, sims, cluster):
        async with Client(url) as c:
            ids = [(await c.queue(sleep_prompt(3)))[1]["prompt_id"] for _ in range(3)]
            await wait_for(lambda: len(sims[0].sim.queue) == 2, sims[0].sim)
            await c.post("/queue", {"delete": [ids[2]]})
            assert [e[2][1] for e in sims[0].sim.queue] == [ids[1]]
            _, q = await c.get("/queue")
            assert [i[1] for i in q["queue_running"]] == [ids[0]]
            assert [i[1] for i in q["queue_pending"]] == [ids[1]]
            await c.post("/queue", {"clear": True})
            assert sims[0].sim.queue == []
            await c.post("/interrupt", {"prompt_id": ids[0]})
            await wait_for(lambda: not cluster.tasks, cluster)


async def test_restart_keeps_queue_history_and_prompts_on_peers(tmp_path):
    from comfylb_ext.sim import start_sim

    sim = await start_sim(name="sim0")

    async def coordinator():
        return await start_balancer(sim_backends([sim]), str(tmp_path),
                                    health_check={"interval": 0.5, "timeout": 1.0})

    try:
        runner, cluster, url = await coordinator()
        await wait_for(lambda: all(p.available for p in cluster.peers.values()), cluster)
        async with Client(url) as c:
            done_before = await c.run(sleep_prompt(0.05))
            ids = [(await c.queue(sleep_prompt(0.5)))[1]["prompt_id"] for _ in range(3)]
            await wait_for(lambda: sim.sim.running is not None, sim.sim)
            client_id = c.client_id
        await runner.cleanup()  # the coordinator stops with one prompt on the peer and two queued

        runner, cluster, url = await coordinator()
        assert set(ids) <= set(cluster.tasks)
        async with Client(url, client_id=client_id) as c:
            for pid in ids:
                c._track(pid)
            await asyncio.wait_for(asyncio.gather(*(c.runs[pid].done.wait() for pid in ids)), 20)
            _, hist = await c.get("/history")
            assert set(ids) | {done_before.prompt_id} <= set(hist)
            assert all(hist[pid]["status"]["status_str"] == "success" for pid in ids)
            assert sorted(p for p in sim.sim.executed if p in ids) == sorted(ids)  # each ran once
            assert hist[ids[0]]["comfylb"]["attempts"][0]["peer"] == "sim0"
        await runner.cleanup()
    finally:
        await sim.stop()


async def test_prompts_go_only_to_peers_that_have_their_model():
    kw = [{"checkpoints": ["only-on-0.safetensors"]}, {"checkpoints": ["only-on-1.safetensors"]}]
    async with lb_over_sims(2, max_queue=2, sim_kw=kw) as (url, sims, cluster):
        await wait_for(lambda: all(p.caps is not None for p in cluster.peers.values()), cluster)
        async with Client(url) as c:
            for i in (0, 1):
                prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"only-on-{i}.safetensors"}},
                          "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
                          "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "m"}}}
                runs = await asyncio.gather(*(c.run(prompt | {"2": {**prompt["2"], "inputs": {
                    **prompt["2"]["inputs"], "color": 10 * j + i}}}) for j in range(3)))
                assert all(r.prompt_id in sims[i].sim.history for r in runs)
            status, body, _ = await c.queue({"1": {"class_type": "CheckpointLoaderSimple",
                                                   "inputs": {"ckpt_name": "nowhere.safetensors"}},
                                             "3": {"class_type": "SaveImage",
                                                   "inputs": {"images": ["1", 0], "filename_prefix": "m"}}})
            assert status == 400 and body["error"]["message"] == "No peer can run this prompt"
            assert "nowhere.safetensors" in body["node_errors"]["1"]["errors"][0]["details"]


async def test_prometheus_metrics():
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            runs = [(await c.queue(sleep_prompt(0.05)))[2] for _ in range(3)]
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 20)
            async with c.session.get(url + "/lb/metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                text = await r.text()
        assert 'comfylb_peer_jobs_total{outcome="success",peer="sim0"} 3.0' in text
        assert 'comfylb_job_duration_seconds_count{peer="sim0"} 3.0' in text
        assert 'comfylb_dispatch_gap_seconds_count{peer="sim0"} 2.0' in text  # two prompts waited for it
        assert "comfylb_queue_depth 0.0" in text and 'comfylb_peer_available{peer="sim0"} 1.0' in text


async def test_comfy_org_keys_reach_the_peer_but_are_never_shown():
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        sim = sims[0].sim
        async with Client(url) as c:
            secret = {"api_key_comfy_org": "sk-very-secret", "auth_token_comfy_org": "tok-secret"}
            _, body, run = await c.queue(sleep_prompt(0.3), extra_data={**secret, "extra_pnginfo": {"x": 1}})
            await c.until(lambda: "execution_start" in run.types())
            assert sim.running[3]["api_key_comfy_org"] == "sk-very-secret"  # forwarded to the peer
            shown = [await c.get("/queue"), await c.get(f"/lb/tasks/{run.prompt_id}"), await c.get("/lb/tasks"),
                     await c.get("/lb/status")]
            await asyncio.wait_for(run.done.wait(), 10)
            shown += [await c.get("/history"), await c.get(f"/history/{run.prompt_id}")]
            text = str(shown)
            assert "sk-very-secret" not in text and "tok-secret" not in text
            assert "extra_pnginfo" in text  # the rest of extra_data is there


async def test_outputs_are_copied_ahead_and_outlive_their_peer():
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            run = await c.run(invert_prompt("kept"))
            image = run.first("executed")["output"]["images"][0]
            assert image["subfolder"] == "sim0"  # the peer's own subfolder
            direct = (sims[0].sim.root / "output" / image["subfolder"] / image["filename"]).read_bytes()
            await wait_for(lambda: cluster.outputs.cache.get(image["subfolder"], image["filename"]) is not None, cluster)
            await sims[0].stop()
            status, body = await c.get("/view", params=image)
            assert status == 200 and body == direct


async def test_views_the_moment_an_image_is_announced_share_one_transfer():
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            _, _, run = await c.queue(invert_prompt("shared"))
            await c.until(lambda: "executed" in run.types())
            image = run.first("executed")["output"]["images"][0]
            path = f"output/{image['subfolder']}/{image['filename']}"
            direct = (sims[0].sim.root / path).read_bytes()
            views = await asyncio.gather(*(c.get("/view", params=image) for _ in range(3)))
            assert views == [(200, direct)] * 3
            await asyncio.wait_for(run.done.wait(), 10)
            await wait_for(lambda: cluster.outputs.cache.get(image["subfolder"], image["filename"]) is not None, cluster)
            assert await c.get("/view", params=image) == (200, direct)
            assert sims[0].sim.views[path] == 1  # one transfer from the peer, copy at the finish included


@pytest.mark.parametrize("order, expected", [("fifo", [0.1, 0.4, 0.2]), ("longest_first", [0.4, 0.2, 0.1])])
async def test_longest_first_runs_the_longest_predicted_prompt_first(order, expected):
    async with lb_over_sims(1, max_queue=1, scheduler={"order": order}) as (url, sims, cluster):
        async with Client(url) as c:
            def sleep(seconds: float) -> dict:
                prompt = sleep_prompt(seconds)
                prompt["1"]["inputs"]["color"] = 7  # only "seconds" varies: three runs can show its effect
                return prompt
            for seconds in (0.05, 0.15, 0.1):
                await c.run(sleep(seconds))
            assert (await c.post("/lb/backends/sim0/disable"))[0] == 200
            runs = {s: (await c.queue(sleep(s)))[2] for s in (0.1, 0.4, 0.2)}
            assert (await c.post("/lb/backends/sim0/enable"))[0] == 200
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs.values())), 20)
            started = sorted(runs, key=lambda s: runs[s].first("execution_start")["timestamp"])
            assert started == expected


async def test_order_switches_at_runtime():
    async with lb_over_sims(1) as (url, sims, cluster):
        async with Client(url) as c:
            assert (await c.get("/lb/scheduler"))[1]["order"] == "fifo"
            status, info = await c.post("/lb/scheduler/order/longest_first")
            assert status == 200 and info["order"] == "longest_first" and cluster.sched.order == "longest_first"
            status, body = await c.post("/lb/scheduler/order/random")
            assert status == 400 and body["orders"] == ["fifo", "longest_first"]


@pytest.mark.parametrize("affinity", [True, False])
async def test_a_prompt_sent_again_goes_where_it_is_cached(affinity):
    async with lb_over_sims(2, max_queue=1, scheduler={"affinity": affinity}) as (url, sims, cluster):
        async with Client(url) as c:
            prompt = sleep_prompt(0.1)
            first = await c.run(prompt)
            again = await c.run(prompt)  # both peers idle: plain least_busy takes the other one
            cached = again.first("execution_cached")["nodes"]
            assert (sorted(cached) == sorted(prompt)) is affinity
            assert (cluster.record[first.prompt_id].peer == cluster.record[again.prompt_id].peer) is affinity


async def test_under_longest_first_prompts_wait_in_the_coordinator_until_a_peer_is_free():
    async with lb_over_sims(1, max_queue=3, scheduler={"order": "longest_first"}) as (url, sims, cluster):
        async with Client(url) as c:
            runs = [(await c.queue(sleep_prompt(0.2)))[2] for _ in range(3)]
            await c.until(lambda: "execution_start" in runs[0].types())
            assert len(cluster.queue) == 2 and sims[0].sim.queue == []  # not sent ahead to the peer
            await c.until(lambda: all(r.done.is_set() for r in runs))


async def test_clear_deletes_a_prompt_dispatched_while_it_clears_on_its_peer():
    """Clearing hands control back at each prompt's end (its client hears of it): a queued
    prompt dispatched meanwhile is taken off its peer, not marked cancelled while it runs."""
    from comfylb_ext.control import QueueControl
    from comfylb_ext.ledger import Ledger
    from comfylb_ext.store import Store
    from comfylb_ext.tasks import CANCELLED, Task

    class Notify:
        def changed(self) -> None: ...
        def queue_changed(self) -> None: ...
        async def status(self) -> None: ...

    class Relay:
        def expect(self, *a) -> None: ...
        async def end(self, client_id, prompt_id) -> None:
            if prompt_id == "a":  # a peer frees up while the client hears of a's end
                ledger.dispatched(b, "p1", None)

    class Recovery:
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def withdraw(self, task, peer) -> bool:
            self.asked.append(task.prompt_id)
            return True

    ledger = Ledger(Store(None), Relay(), Notify())
    a, b = Task("a", 1, {}, {}, []), Task("b", 2, {}, {}, [])
    for t in (a, b):
        await ledger.accepted(t)
    recovery = Recovery()
    await QueueControl(ledger, {"p1": object()}, recovery, Notify(), lambda: None).clear()
    assert recovery.asked == ["b"] and a.state == b.state == CANCELLED and not ledger.tasks
