"""Big prompts: finished tasks let go of them, and the answers that carry them are
encoded off the event loop, so one client's large workflow does not freeze the others."""
from __future__ import annotations

import asyncio
import threading

from comfylb_ext import jsonsafe
from tests.client import Client, sleep_prompt
from tests.simcluster import lb_over_sims, wait_for


async def test_a_finished_task_holds_no_prompt_but_its_history_does():
    async with lb_over_sims(1) as (url, sims, cluster):
        async with Client(url) as c:
            prompt = sleep_prompt(0)
            prompt["1"]["inputs"]["note"] = "x" * 100_000
            _, _, run = await c.queue(prompt)
            assert (await c.get("/queue"))[0] == 200  # its queue item made (and kept) while it is live
            await asyncio.wait_for(run.done.wait(), 30)
            await wait_for(lambda: run.prompt_id not in cluster.tasks, cluster)
            task = cluster.record[run.prompt_id]
            assert task.prompt is None and not task.item_json_made and task.req is None
            status, history = await c.get(f"/history/{run.prompt_id}")
            assert status == 200 and history[run.prompt_id]["prompt"][2]["1"]["inputs"]["note"] == "x" * 100_000
            _, page = await c.get("/history", params={"max_items": "1"})
            assert list(page) == [run.prompt_id]


async def test_a_polled_job_keeps_its_place_in_the_queue_until_its_poller_sees_it_end():
    async with lb_over_sims(1) as (url, sims, cluster):
        async with Client(url) as c:
            _, _, run = await c.queue(sleep_prompt(0.5))
            assert (await c.get(f"/history/{run.prompt_id}")) == (200, {})  # asked while live: lingers
            await asyncio.wait_for(run.done.wait(), 30)
            _, queue = await c.get("/queue")
            assert [item[1] for item in queue["queue_running"]] == [run.prompt_id]
            assert queue["queue_running"][0][2]["2"]["class_type"] == "TestSleep"


async def test_large_answers_are_encoded_off_the_event_loop(monkeypatch):
    """GET /queue, /history and /object_info encode in a worker thread: a few large
    prompts once froze every client for seconds per request."""
    threads: list[bool] = []
    encode = jsonsafe.dumps

    def recording(value, **kw):
        threads.append(threading.current_thread() is threading.main_thread())
        return encode(value, **kw)
    monkeypatch.setattr(jsonsafe, "dumps", recording)
    async with lb_over_sims(1, max_queue=1) as (url, sims, cluster):
        async with Client(url) as c:
            done = await c.run(sleep_prompt(0))
            _, _, waiting = await c.queue(sleep_prompt(5))
            threads.clear()
            for path in ("/queue", "/history", f"/history/{done.prompt_id}", "/object_info"):
                assert (await c.get(path))[0] == 200
            assert threads and not any(threads), threads
            big = sleep_prompt(5)
            big["1"]["inputs"]["note"] = "x" * (2 << 20)  # not kept: made again for each GET /queue
            _, _, large = await c.queue(big)
            _, _, small = await c.queue(sleep_prompt(5))
            first, second = await c.get("/queue"), await c.get("/queue")
            assert first == second and [i[1] for i in first[1]["queue_pending"]][-2:] == [
                large.prompt_id, small.prompt_id]
            assert first[1]["queue_pending"][-2][2]["1"]["inputs"]["note"] == big["1"]["inputs"]["note"]
            assert cluster.tasks[small.prompt_id].item_json_made and not cluster.tasks[large.prompt_id].item_json_made
            await c.post("/queue", {"clear": True})
            await c.post("/interrupt", {"prompt_id": waiting.prompt_id})


async def test_a_large_prompt_is_checked_and_written_off_the_event_loop(monkeypatch):
    """A 30 MB prompt once held every other client for up to 0.8 s while it was checked
    and written down on the event loop."""
    import json
    import types

    from comfylb_ext import admission, store

    on_loop: dict[str, list[bool]] = {"check": [], "encode": []}
    check, dumps = admission.check, json.dumps

    def checking(*a, **kw):
        on_loop["check"].append(threading.current_thread() is threading.main_thread())
        return check(*a, **kw)

    def encoding(value, *a, **kw):
        if isinstance(value, dict) and "prompt" in value:  # a task's body, or a history entry
            prompt = value["prompt"][2] if isinstance(value["prompt"], list) else value["prompt"]
            if "note" in prompt["1"]["inputs"]:  # the large one's
                on_loop["encode"].append(threading.current_thread() is threading.main_thread())
        return dumps(value, *a, **kw)
    monkeypatch.setattr(admission, "check", checking)
    # the store's own json only (patching the json module would reach every encoder in the process)
    monkeypatch.setattr(store, "json", types.SimpleNamespace(dumps=encoding, loads=json.loads))
    async with lb_over_sims(1) as (url, sims, cluster):
        async with Client(url) as c:
            small = await c.run(sleep_prompt(0))
            big = sleep_prompt(0)
            big["1"]["inputs"]["note"] = "x" * (2 << 20)
            run = await c.run(big)
            assert "execution_success" in small.types() and "execution_success" in run.types()
    assert on_loop["check"] == [True, False]  # a small prompt is checked at once; a large one in a thread
    # its body and history entry encoded on the database's thread (a small one's at once)
    assert len(on_loop["encode"]) >= 2 and not any(on_loop["encode"]), on_loop["encode"]
