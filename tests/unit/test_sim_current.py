"""The simulated peer must behave like today's ComfyUI (server ~0.38: the jobs API, the new
/prompt rules, websocket changes, /free and settings), driven directly over HTTP and websocket."""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import aiohttp
import pytest

from comfylb_ext.jobs import is_canonical_uuid
from comfylb_ext.sim import start_sim
from comfylb_ext.errors import error_body
from comfylb_ext.validation import validate
from tests.client import Client, invert_prompt, sleep_prompt
from tests.procs import DATA

INVALID_ID = {"error": {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
                        "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                                   "omit it to let the server generate one", "extra_info": {}},
              "node_errors": {}}
FLAGS = {"supports_preview_metadata": True, "supports_model_type_tags": True, "max_upload_size": 104857600,
         "extension": {"manager": {"supports_v4": True}}, "node_replacements": True, "assets": False}
TYPE = re.compile(r'WS text(?: \(trailing\))?: \{"type": "(\w+)"')


def recorded(section: str) -> list[str]:
    body = (DATA / "transcript.md").read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return TYPE.findall(body)


class Recorder(Client):
    """A Client that also keeps every text message, status included, in arrival order."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.log: list[tuple[str, dict]] = []

    async def _handle(self, msg) -> None:
        if msg.type == aiohttp.WSMsgType.TEXT:
            m = json.loads(msg.data)
            self.log.append((m["type"], m["data"]))
        await super()._handle(msg)

    def about(self, pid: str) -> list[str]:
        return [t for t, d in self.log if isinstance(d, dict) and d.get("prompt_id") == pid]


@pytest.fixture
async def sim():
    server = await start_sim()
    yield server
    await server.stop()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def until(cond, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


# -- 1. POST /prompt ---------------------------------------------------------------------
async def test_prompt_id_must_be_a_canonical_lowercase_uuid(sim):
    good = str(uuid.uuid4())
    async with Client(url(sim)) as c:
        for bad in [good.upper(), "{" + good + "}", "urn:uuid:" + good, good.replace("-", ""), f" {good}",
                    "lb-671c4589bb894baf8b9ae9189682ac3e", "", 123, [good], {"id": good}]:
            status, body, _ = await c.queue(invert_prompt(), prompt_id=bad)
            assert (status, body) == (400, INVALID_ID), bad
        assert sim.sim.queue == [] and sim.sim.history == {}
        run = await c.run(invert_prompt(), prompt_id=good)
        assert run.prompt_id == good
        status, body, _ = await c.queue(invert_prompt(), prompt_id=None)  # null: the server mints one
        assert status == 200 and is_canonical_uuid(body["prompt_id"])


async def test_a_pending_or_running_id_is_a_409_and_a_finished_one_may_come_again(sim):
    running, pending, done = (str(uuid.uuid4()) for _ in range(3))
    async with Client(url(sim)) as c:
        await c.run(invert_prompt(), prompt_id=done)
        assert (await c.queue(sleep_prompt(5), prompt_id=running))[0] == 200
        await c.until(lambda: "execution_start" in c.runs[running].types())
        assert (await c.queue(sleep_prompt(5), prompt_id=pending))[0] == 200
        for pid in (running, pending):
            status, body = await c.post("/prompt", {"prompt": invert_prompt(), "prompt_id": pid})
            assert status == 409
            assert body["error"]["type"] == "duplicate_prompt_id" and body["node_errors"] == {}
            assert set(body["error"]) == {"type", "message", "details", "extra_info"}
        assert [e[2][1] for e in sim.sim.queue] == [pending]  # nothing more queued
        # a finished id is taken again; its history entry is replaced where it stood
        first = sim.sim.history[done]["prompt"][0]
        assert (await c.post("/prompt", {"prompt": invert_prompt(), "prompt_id": done}))[0] == 200
        assert (await c.post("/api/jobs/cancel", {"job_ids": [pending, running]})) == (200, {"cancelled": True})
        await until(lambda: sim.sim.history.get(done, {}).get("prompt", [first])[0] != first
                    and running in sim.sim.history)
        assert list(sim.sim.history) == [done, running]


async def test_create_time_is_set_and_secrets_are_never_shown(sim):
    async with Client(url(sim)) as c:
        before = int(time.time() * 1000)
        secret = {"api_key_comfy_org": "sk-very-secret", "auth_token_comfy_org": "tok-secret"}
        status, body = await c.post("/prompt", {"prompt": sleep_prompt(5), "client_id": c.client_id,
                                                "extra_data": {**secret, "extra_pnginfo": {"x": 1}}},
                                    headers={"Comfy-Usage-Source": "a-script"})
        assert status == 200
        pid = body["prompt_id"]
        await until(lambda: sim.sim.running is not None)
        extra = sim.sim.running[3]
        assert before <= extra["create_time"] <= int(time.time() * 1000) and isinstance(extra["create_time"], int)
        assert extra["comfy_usage_source"] == "a-script" and extra["api_key_comfy_org"] == "sk-very-secret"
        shown = [await c.get("/queue"), await c.get("/api/jobs"), await c.get(f"/api/jobs/{pid}")]
        await c.post(f"/api/jobs/{pid}/cancel")
        await until(lambda: pid in sim.sim.history)
        shown += [await c.get("/history"), await c.get(f"/api/jobs/{pid}")]
        assert "secret" not in str(shown) and "extra_pnginfo" in str(shown)
        assert sim.sim.history[pid]["prompt"][3]["create_time"] == extra["create_time"]


async def test_a_body_that_is_not_json_is_a_400_in_comfyuis_shape(sim):
    async with aiohttp.ClientSession() as s:
        for raw in (b"{not json", b"", b"\xff"):
            async with s.post(url(sim) + "/prompt", data=raw) as r:
                body = await r.json()
                assert r.status == 400 and body["node_errors"] == {}
                assert body["error"]["type"] == "invalid_prompt"
                assert set(body["error"]) == {"type", "message", "details", "extra_info"}
        async with s.post(url(sim) + "/prompt", json=[1, 2]) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_prompt"


async def test_value_refusals_are_validates_answer_against_the_peers_own_catalog(sim):
    async with Client(url(sim)) as c:
        missing = {"1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
                   "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        status, body = await c.post("/prompt", {"prompt": missing})
        assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
        # as recorded from real ComfyUI (transcript §7.2)
        assert body["node_errors"] == {"1": {"errors": [{
            "type": "custom_validation_failed", "message": "Custom validation failed for node",
            "details": "image - Invalid image file: missing.png", "extra_info": {"input_name": "image"}}],
            "dependent_outputs": ["2"], "class_type": "LoadImage"}}
        too_big = invert_prompt()
        too_big["1"]["inputs"]["width"] = 99999
        for prompt in (missing, too_big):
            ok, error, _, node_errors = validate(prompt, sim.sim.object_info(), None,
                                                 known_files=sim.sim.has_file, link_types=True)
            assert not ok
            assert await c.post("/prompt", {"prompt": prompt}) == (400, error_body(error, node_errors))
        # the file arrives in its input folder (so in its catalog's list): now accepted
        form = aiohttp.FormData()
        form.add_field("image", (DATA / "upload_test.png").read_bytes(), filename="missing.png")
        assert (await c.post("/upload/image", data=form))[0] == 200
        assert "missing.png" in (await c.get("/object_info/LoadImage"))[1]["LoadImage"]["input"]["required"]["image"][0]
        await c.run(missing)


# -- 2. status ----------------------------------------------------------------------------
async def test_the_status_after_a_prompt_says_0_before_executing_null(sim):
    async with Recorder(url(sim)) as c:
        for section in ("1. EmptyImage", "2. Same prompt again"):
            c.log.clear()
            c.log.append(("status", {}))  # the recording starts with the connect-time status
            prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                    "color": 16711680}},
                      "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                      "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "lbtest"}}}
            run = await c.run(prompt)
            assert [t for t, _ in c.log] == recorded(section)
            statuses = [d["status"]["exec_info"]["queue_remaining"] for t, d in c.log[1:] if t == "status"]
            assert statuses == [1, 1, 0]  # on enqueue, on dequeue, after the prompt
            assert c.log[-2][0] == "status" and c.log[-1] == ("executing", {"node": None,
                                                                            "prompt_id": run.prompt_id})
            assert await c.get("/prompt") == (200, {"exec_info": {"queue_remaining": 0}})
        # an interrupted prompt ends the same way
        c.log.clear()
        status, body, run = await c.queue(sleep_prompt(5))
        await c.until(lambda: "execution_start" in run.types())
        await c.post("/interrupt", {"prompt_id": run.prompt_id})
        await asyncio.wait_for(run.done.wait(), 10)
        tail = [(t, d.get("status", d).get("exec_info", {}).get("queue_remaining")) for t, d in c.log[-3:]]
        assert tail == [("execution_interrupted", None), ("status", 0), ("executing", None)]
        assert await c.get("/api/prompt") == (200, {"exec_info": {"queue_remaining": 0}})


# -- 3. /history paging, /object_info/{class} ---------------------------------------------------
async def test_history_pages_as_comfyui_does(sim):
    async with Client(url(sim)) as c:
        ids = [(await c.run(invert_prompt())).prompt_id for _ in range(4)]

        async def keys(query: str) -> list[str]:
            status, body = await c.get("/history" + query)
            assert status == 200
            return list(body)
        assert await keys("") == ids
        assert await keys("?max_items=2") == ids[2:]            # the newest, oldest first
        assert await keys("?max_items=9") == ids
        assert await keys("?max_items=2&offset=1") == ids[1:3]
        assert await keys("?offset=3") == ids[3:]
        assert await keys("?max_items=0") == []
        assert await keys("?offset=-2&max_items=1") == ids[3:]  # a negative offset counts back too
        assert (await c.get("/history?max_items=1"))[1][ids[3]] == sim.sim.history[ids[3]]


async def test_object_info_of_one_class(sim):
    async with Client(url(sim)) as c:
        full = (await c.get("/object_info"))[1]
        assert await c.get("/object_info/SaveImage") == (200, {"SaveImage": full["SaveImage"]})
        assert await c.get("/api/object_info/LoadImage") == (200, {"LoadImage": full["LoadImage"]})
        assert await c.get("/object_info/NoSuchNode") == (200, {})


# -- 4. the jobs API ----------------------------------------------------------------------------
async def test_jobs_list_detail_and_filters(sim):
    async with Client(url(sim)) as c:
        done = await c.run(invert_prompt("jobs"))
        await asyncio.sleep(0.01)  # create_time is in ms: no ties in the order asserted below
        _, _, running = await c.queue(sleep_prompt(5))
        await c.until(lambda: "execution_start" in running.types())
        await asyncio.sleep(0.01)
        _, _, pending = await c.queue(sleep_prompt(5), extra_data={"extra_pnginfo": {"workflow": {"id": "wf-1"}}})
        for prefix in ("/api", "/api/api"):
            status, body = await c.get(prefix + "/jobs")
            assert status == 200
            assert [(j["id"], j["status"]) for j in body["jobs"]] == [
                (pending.prompt_id, "pending"), (running.prompt_id, "in_progress"), (done.prompt_id, "completed")]
            assert body["pagination"] == {"offset": 0, "limit": None, "total": 3, "has_more": False}
        assert (await c.get("/jobs"))[0] == 404  # never bare
        jobs = {j["id"]: j for j in (await c.get("/api/jobs"))[1]["jobs"]}
        assert all(isinstance(j["create_time"], int) for j in jobs.values())
        assert jobs[pending.prompt_id]["workflow_id"] == "wf-1"
        preview = jobs[done.prompt_id]["preview_output"]
        assert preview["nodeId"] == "3" and preview["mediaType"] == "images" and preview["type"] == "output"
        assert jobs[done.prompt_id]["outputs_count"] == 1
        status, body = await c.get("/api/jobs?status=in_progress,pending&limit=1&offset=1")
        assert [j["id"] for j in body["jobs"]] == [running.prompt_id]
        assert body["pagination"] == {"offset": 1, "limit": 1, "total": 2, "has_more": False}
        assert (await c.get("/api/jobs?status=completed&sort_order=asc"))[1]["jobs"][0]["id"] == done.prompt_id
        assert await c.get("/api/jobs?workflow_id=wf-1") == (200, {"jobs": [jobs[pending.prompt_id]], "pagination": {
            "offset": 0, "limit": None, "total": 1, "has_more": False}})
        assert await c.get("/api/jobs?limit=0") == (400, {"error": "limit must be a positive integer"})
        assert (await c.get("/api/jobs?status=nope"))[0] == 400
        # detail: history first, then running, then pending
        status, detail = await c.get(f"/api/jobs/{done.prompt_id}")
        assert detail["outputs"] == sim.sim.history[done.prompt_id]["outputs"]
        assert detail["execution_status"] == sim.sim.history[done.prompt_id]["status"]
        assert detail["workflow"]["prompt"] == sim.sim.history[done.prompt_id]["prompt"][2]
        status, detail = await c.get(f"/api/api/jobs/{pending.prompt_id}")
        assert detail["status"] == "pending"
        assert detail["workflow"]["extra_data"]["extra_pnginfo"]["workflow"]["id"] == "wf-1"
        assert (await c.get(f"/api/jobs/{running.prompt_id}"))[1]["status"] == "in_progress"
        assert await c.get(f"/api/jobs/{uuid.uuid4()}") == (404, {"error": "Job not found"})
        await c.post("/api/jobs/cancel", {"job_ids": [pending.prompt_id, running.prompt_id]})


async def test_cancel_dequeues_pending_silently_and_interrupts_running(sim):
    async with Recorder(url(sim)) as c:
        done = await c.run(invert_prompt())
        _, _, running = await c.queue(sleep_prompt(5))
        await c.until(lambda: "execution_start" in running.types())
        _, _, pending = await c.queue(sleep_prompt(5))
        assert await c.post(f"/api/jobs/{pending.prompt_id}/cancel") == (200, {"cancelled": True})
        assert sim.sim.queue == [] and (await c.get("/queue"))[1]["queue_pending"] == []
        assert await c.post(f"/api/api/jobs/{running.prompt_id}/cancel") == (200, {"cancelled": True})
        await asyncio.wait_for(running.done.wait(), 10)
        assert "execution_interrupted" in running.types()
        assert (await c.get(f"/api/jobs/{running.prompt_id}"))[1]["status"] == "cancelled"
        assert c.about(pending.prompt_id) == [] and pending.prompt_id not in sim.sim.history
        for pid in (done.prompt_id, running.prompt_id, str(uuid.uuid4()), "not-a-uuid"):  # finished or unknown
            assert await c.post(f"/api/jobs/{pid}/cancel") == (200, {"cancelled": False})


async def test_batch_cancel_checks_every_id_first(sim):
    async with Client(url(sim)) as c:
        _, _, running = await c.queue(sleep_prompt(5))
        await c.until(lambda: "execution_start" in running.types())
        _, _, pending = await c.queue(sleep_prompt(5))
        async with c.session.post(c.base + "/api/jobs/cancel", data=b"{nope") as r:
            assert (r.status, await r.json()) == (400, {"error": "Request body must be valid JSON"})
        assert await c.post("/api/jobs/cancel", {"job_ids": pending.prompt_id}) == (
            400, {"error": "job_ids must be a list"})
        assert await c.post("/api/jobs/cancel", {"job_ids": [pending.prompt_id, "X", 7]}) == (
            400, {"error": "job_ids contains invalid id(s)", "invalid_ids": ["X", "7"]})
        assert [e[2][1] for e in sim.sim.queue] == [pending.prompt_id]  # nothing cancelled
        assert await c.post("/api/jobs/cancel", {"job_ids": []}) == (200, {"cancelled": False})
        assert await c.post("/api/jobs/cancel", {"job_ids": [str(uuid.uuid4()), pending.prompt_id,
                                                              running.prompt_id]}) == (200, {"cancelled": True})
        await asyncio.wait_for(running.done.wait(), 10)
        assert sim.sim.queue == [] and pending.prompt_id not in sim.sim.history
        assert sim.sim.history[running.prompt_id]["status"]["status_str"] == "error"


# -- 5. /free, /node_replacements, settings, users -------------------------------------------------
async def test_free_unloads_models_and_drops_the_cache(sim):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sim-a.safetensors"}},
              "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": 0.0}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    async with Client(url(sim)) as c:
        await c.run(prompt)
        assert sim.sim.model_loads == 1 and sim.sim.loaded_model == "sim-a.safetensors"
        assert await c.post("/free", {"unload_models": True}) == (200, None)
        await until(lambda: sim.sim.loaded_model is None)
        assert (await c.run(prompt)).first("execution_cached")["nodes"] == ["1", "2", "3"]  # still cached
        assert await c.post("/api/free", {"free_memory": True}) == (200, None)
        await until(lambda: sim.sim.cache == {})
        assert (await c.run(prompt)).first("execution_cached")["nodes"] == []
        assert sim.sim.model_loads == 2


REPLACEMENTS = {"OldInvert": [{"old_node_id": "OldInvert", "new_node_id": "ImageInvert", "old_widget_ids": None,
                               "input_mapping": [{"new_id": "image", "old_id": "pixels"}], "output_mapping": None}]}


async def test_node_replacements_are_served_and_applied():
    plain, replacing = await start_sim(), await start_sim(replacements=REPLACEMENTS)
    try:
        prompt = invert_prompt()
        prompt["2"] = {"class_type": "OldInvert", "inputs": {"pixels": ["1", 0]}}
        async with Client(url(plain)) as c:
            assert await c.get("/node_replacements") == (200, {})
            status, body = await c.post("/prompt", {"prompt": prompt})
            assert status == 400 and body["error"]["type"] == "invalid_prompt"
        async with Client(url(replacing)) as c:
            assert await c.get("/api/node_replacements") == (200, REPLACEMENTS)
            run = await c.run(prompt)
            assert replacing.sim.history[run.prompt_id]["prompt"][2]["2"] == {
                "class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    finally:
        await plain.stop()
        await replacing.stop()


async def test_settings_and_users_of_the_single_user(sim):
    async with Client(url(sim)) as c:
        assert await c.get("/users") == (200, {"storage": "server", "migrated": False})
        assert await c.get("/settings") == (200, {})
        assert await c.get("/settings/Comfy.Locale") == (200, None)
        assert await c.post("/settings", {"a": 1, "Comfy.Locale": "en"}) == (200, None)
        assert await c.post("/api/settings", {"a": 2, "b": [1]}) == (200, None)  # merged
        assert await c.get("/settings") == (200, {"a": 2, "Comfy.Locale": "en", "b": [1]})
        assert await c.get("/api/settings/Comfy.Locale") == (200, "en")
        assert await c.post("/settings/c", {"x": True}) == (200, None)
        assert await c.get("/settings/c") == (200, {"x": True})
        assert await c.get("/users") == (200, {"storage": "server", "migrated": True})


# -- 6. feature flags -------------------------------------------------------------------------
async def test_feature_flags_are_todays(sim):
    async with Client(url(sim), flags=True) as c:
        await c.until(lambda: c.feature_reply is not None)
        assert c.feature_reply == FLAGS
        assert await c.get("/features") == (200, FLAGS)


# -- 7. asset ids ------------------------------------------------------------------------------
async def test_asset_ids_on_outputs_only_when_asked():
    plain, assets = await start_sim(), await start_sim(asset_ids=True)
    try:
        async with Client(url(plain)) as c:
            run = await c.run(invert_prompt())
            assert set(run.first("executed")["output"]["images"][0]) == {"filename", "subfolder", "type"}
        async with Client(url(assets), flags=True) as c:
            await c.until(lambda: c.feature_reply is not None)
            assert c.feature_reply["assets"] is True
            prompt = invert_prompt()
            run = await c.run(prompt)
            image = run.first("executed")["output"]["images"][0]
            assert is_canonical_uuid(image["id"]) and is_canonical_uuid(image["preview_id"])
            assert assets.sim.history[run.prompt_id]["outputs"]["3"]["images"][0] == image
            cached = await c.run(prompt)  # the cached replay names the same asset
            assert cached.first("executed")["output"]["images"][0] == image
            assert (await c.get(f"/api/jobs/{run.prompt_id}"))[1]["outputs"]["3"]["images"][0] == image
    finally:
        await plain.stop()
        await assets.stop()
