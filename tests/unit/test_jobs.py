"""The jobs API rules (comfylb_ext.jobs) against ComfyUI's own: query checks and their exact
400 messages, job shaping from queue tuples and history entries, previews, and paging."""
import pytest

from comfylb_ext.jobs import (
    STATUSES, JobsError, Query, history_job, is_canonical_uuid, list_jobs, parse_cancel_ids,
    parse_query, queue_detail, queue_job,
)

UUID = "a1b2c3d4-e5f6-7a89-b0c1-d2e3f4a5b6c7"
VALID_LIST = "pending, in_progress, completed, failed, cancelled"


def item(number=3, pid="p1", create_time=1000, workflow_id=None, **extra):
    extra_data = dict(extra)
    if create_time is not None:
        extra_data["create_time"] = create_time
    if workflow_id is not None:
        extra_data["extra_pnginfo"] = {"workflow": {"id": workflow_id, "nodes": []}}
    return [number, pid, {"1": {"class_type": "SaveImage", "inputs": {}}}, extra_data, ["1"]]


def entry(status_str="success", messages=(), outputs=None, **item_kw):
    return {"prompt": item(**item_kw), "outputs": outputs or {}, "meta": {},
            "status": {"status_str": status_str, "completed": status_str == "success",
                       "messages": [list(m) for m in messages]}}


def preview_of(outputs):
    return history_job("p", entry(outputs=outputs)).get("preview_output")


# -- query parameters ---------------------------------------------------------------------
def test_defaults_list_everything_newest_first_without_a_limit():
    assert parse_query({}) == Query(frozenset(STATUSES), None, "created_at", "desc", None, 0)


def test_status_is_comma_separated_case_insensitive_and_trimmed():
    assert parse_query({"status": " Completed,FAILED ,,"}).statuses == {"completed", "failed"}
    assert parse_query({"status": ""}).statuses == set(STATUSES)  # empty means all


def test_an_unknown_status_is_a_400_naming_it_and_the_valid_ones():
    with pytest.raises(JobsError) as e:
        parse_query({"status": "pending,Done,running"})
    assert str(e.value) == f"Invalid status value(s): done, running. Valid values: {VALID_LIST}"
    assert e.value.body() == {"error": str(e.value)}
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("params, message", [
    ({"sort_by": "duration"}, "sort_by must be 'created_at' or 'execution_duration'"),
    ({"sort_by": ""}, "sort_by must be 'created_at' or 'execution_duration'"),
    ({"sort_order": "up"}, "sort_order must be 'asc' or 'desc'"),
    ({"limit": "0"}, "limit must be a positive integer"),
    ({"limit": "-3"}, "limit must be a positive integer"),
    ({"limit": "ten"}, "limit must be an integer"),
    ({"limit": "1.5"}, "limit must be an integer"),
    ({"limit": ""}, "limit must be an integer"),
    ({"offset": "x"}, "offset must be an integer"),
    # checked in ComfyUI's order: status, sort_by, sort_order, limit, offset
    ({"status": "nope", "sort_by": "bad"}, f"Invalid status value(s): nope. Valid values: {VALID_LIST}"),
    ({"sort_by": "bad", "limit": "0"}, "sort_by must be 'created_at' or 'execution_duration'"),
    ({"limit": "0", "offset": "x"}, "limit must be a positive integer"),
])
def test_bad_parameters_give_comfyuis_messages(params, message):
    with pytest.raises(JobsError) as e:
        parse_query(params)
    assert e.value.message == message


def test_sort_values_are_case_insensitive_and_a_negative_offset_clamps_to_zero():
    q = parse_query({"sort_by": "Execution_Duration", "sort_order": "ASC", "limit": "5", "offset": "-7",
                     "workflow_id": "wf"})
    assert (q.sort_by, q.sort_order, q.limit, q.offset, q.workflow_id) == (
        "execution_duration", "asc", 5, 0, "wf")
    assert parse_query({"workflow_id": ""}).workflow_id is None  # empty: no filter


# -- ids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, ok", [
    (UUID, True),
    (UUID.upper(), False),
    ("{" + UUID + "}", False),
    ("urn:uuid:" + UUID, False),
    (UUID.replace("-", ""), False),
    (" " + UUID + " ", False),
    ("", False), ("not-a-uuid", False), ("a1b2c3d4-e5f6-7a89-b0c1", False), ("None", False),
    (123, False), (1.5, False), (True, False), (None, False), ([UUID], False), ({"id": UUID}, False),
])
def test_only_the_canonical_lowercase_hyphenated_uuid_is_an_id(value, ok):
    assert is_canonical_uuid(value) is ok


@pytest.mark.parametrize("body", [None, [UUID], "x", {}, {"job_ids": UUID}, {"job_ids": None}])
def test_cancel_body_needs_a_job_ids_list(body):
    with pytest.raises(JobsError, match="^job_ids must be a list$"):
        parse_cancel_ids(body)


def test_cancel_rejects_the_whole_batch_listing_every_invalid_id():
    with pytest.raises(JobsError) as e:
        parse_cancel_ids({"job_ids": [UUID, UUID.upper(), 7, None, {"a": 1}]})
    assert e.value.body() == {"error": "job_ids contains invalid id(s)",
                              "invalid_ids": [UUID.upper(), "7", "None", "{'a': 1}"]}
    assert parse_cancel_ids({"job_ids": [UUID, UUID]}) == [UUID, UUID]
    assert parse_cancel_ids({"job_ids": []}) == []


# -- queue items --------------------------------------------------------------------------
def test_a_queue_item_carries_only_the_list_fields():
    job = queue_job(item(10, "p9", 1234, workflow_id="wf-1"), "pending")
    assert job == {"id": "p9", "status": "pending", "priority": 10, "create_time": 1234,
                   "workflow_id": "wf-1", "outputs_count": 0, "previewable_outputs_count": 0}


def test_none_fields_are_dropped_and_create_time_is_always_a_number():
    job = queue_job(item(create_time=None), "in_progress", create_time=5555.0)
    assert "workflow_id" not in job and job["create_time"] == 5555.0
    assert queue_job(item(create_time="soon"), "pending")["create_time"] == 0
    assert queue_job(item(create_time=77), "pending", create_time=5)["create_time"] == 77
    with pytest.raises(ValueError):
        queue_job(item(), "completed")


def test_queue_detail_adds_the_workflow_for_open_workflow_without_secrets():
    it = item(workflow_id="wf", auth_token_comfy_org="secret", client_id="c")
    job = queue_detail(it, "in_progress")
    assert job["status"] == "in_progress" and job["workflow"]["prompt"] == it[2]
    assert job["workflow"]["extra_data"]["extra_pnginfo"]["workflow"]["id"] == "wf"
    assert "auth_token_comfy_org" not in job["workflow"]["extra_data"]
    assert job["workflow"]["extra_data"]["client_id"] == "c"


# -- history status and timing ------------------------------------------------------------
def test_a_completed_job_has_times_from_its_messages():
    job = history_job("p", entry(messages=[("execution_start", {"timestamp": 1500}),
                                           ("execution_cached", {"nodes": [], "timestamp": 1501}),
                                           ("execution_success", {"timestamp": 4000})],
                                 number=5, workflow_id="wf"))
    assert job == {"id": "p", "status": "completed", "priority": 5, "create_time": 1000,
                   "workflow_id": "wf", "execution_start_time": 1500, "execution_end_time": 4000,
                   "completion_status": "success", "has_errors": False, "execution_error_count": 0,
                   "outputs_count": 0, "previewable_outputs_count": 0}


def test_an_error_is_failed_with_the_error_and_an_interrupt_is_cancelled_without_one():
    err = {"node_id": "5", "node_type": "KSampler", "exception_message": "CUDA out of memory",
           "exception_type": "RuntimeError", "traceback": [], "timestamp": 2000}
    failed = history_job("p", entry("error", [("execution_start", {"timestamp": 1500}),
                                              ("execution_error", err)]))
    assert failed["status"] == "failed" and failed["execution_error"] == err
    assert failed["execution_end_time"] == 2000
    assert (failed["has_errors"], failed["execution_error_count"]) == (True, 1)
    assert "completion_status" not in failed

    cancelled = history_job("p", entry("error", [("execution_start", {"timestamp": 1500}),
                                                 ("execution_interrupted", {"node_id": "5", "timestamp": 1900})]))
    assert cancelled["status"] == "cancelled" and "execution_error" not in cancelled
    assert cancelled["execution_end_time"] == 1900


def test_error_without_an_interrupt_message_is_failed_and_no_status_means_completed():
    assert history_job("p", entry("error"))["status"] == "failed"
    for status in (None, {}):
        e = entry()
        e["status"] = status
        job = history_job("p", e)
        assert job["status"] == "completed"
        assert not {"completion_status", "has_errors", "execution_error_count"} & job.keys()
    e = entry()
    del e["status"]
    assert history_job("p", e)["status"] == "completed"


def test_partial_success_fields_come_from_the_summary_and_node_errors():
    node_error = {"node_id": "2", "node_type": "X", "exception_message": "failed", "timestamp": 200}
    e = entry(messages=[("execution_start", {"timestamp": 150}), ("execution_node_error", node_error),
                        ("execution_success", {"completion_status": "partial_success", "timestamp": 300})])
    job = history_job("p", e, detail=True)
    assert (job["status"], job["completion_status"], job["has_errors"], job["execution_error_count"]) == (
        "completed", "partial_success", True, 1)
    assert job["execution_errors"] == [node_error]
    e["status"]["execution_summary"] = {"completion_status": "partial_success", "has_errors": True,
                                        "execution_error_count": 4}
    assert history_job("p", e)["execution_error_count"] == 4
    assert "execution_errors" not in history_job("p", e)  # detail only


def test_detail_adds_outputs_status_and_workflow():
    e = entry(outputs={"9": {"images": [{"filename": "a.png", "type": "output"}, None],
                             "result": ["mesh.GLB", None, "camera_info"], "animated": [False]},
                       "10": "odd"}, workflow_id="wf")
    job = history_job("p", e, detail=True)
    assert job["outputs"] == {
        "9": {"images": [{"filename": "a.png", "type": "output"}],
              "result": [{"filename": "mesh.GLB", "type": "output", "subfolder": "", "mediaType": "3d"},
                         "camera_info"],
              "animated": [False]},
        "10": "odd"}
    assert job["execution_status"] is e["status"] and job["execution_errors"] == []
    assert job["workflow"] == {"prompt": e["prompt"][2], "extra_data": e["prompt"][3]}
    assert "outputs" not in history_job("p", e)


# -- outputs: counts and previews ---------------------------------------------------------
def test_outputs_count_counts_items_but_not_flags_raw_text_or_none():
    job = history_job("p", entry(outputs={
        "1": {"images": [{"filename": "a.png", "type": "output"}, {"filename": "b.png", "type": "output"}],
              "animated": [True, {"filename": "flag.gif"}], "metadata": "string", "count": 42},
        "2": {"latents": [{"filename": "x.latent", "type": "output"}]},
        "3": {"text": ["a caption"], "result": ["model.obj", None, "not-a-file"]},
    }))
    assert job["outputs_count"] == 4  # 2 images, the latent, the 3D file
    assert job["previewable_outputs_count"] == 3  # the latent does not render


@pytest.mark.parametrize("items, expect", [
    ({"images": [{"filename": "t.png", "type": "temp"}, {"filename": "o.png", "type": "output"}]}, "o.png"),
    ({"images": [{"filename": "t1.png", "type": "temp"}, {"filename": "t2.png", "type": "temp"}]}, "t1.png"),
    ({"files": [{"filename": "clip.bin", "format": "video/x-custom", "type": "output"}]}, "clip.bin"),
    ({"files": [{"filename": "MODEL.FBX", "type": "output"}]}, "MODEL.FBX"),
    ({"latents": [{"filename": "l.latent", "type": "output"}]}, None),
    ({"files": [{"filename": "doc.pdf", "format": "application/pdf", "type": "output"}]}, None),
])
def test_preview_choice_within_a_node(items, expect):
    preview = preview_of({"n": items})
    assert (preview or {}).get("filename") == expect


def test_visual_media_beats_saved_text_which_beats_raw_text_whatever_the_node_order():
    text_node = {"text": ["the text"], "files": [{"filename": "ComfyUI_00001.txt", "type": "output"}]}
    temp_image = {"images": [{"filename": "preview.png", "type": "temp"}]}
    assert preview_of({"a": text_node, "b": temp_image})["filename"] == "preview.png"
    assert preview_of({"a": text_node, "b": {"files": [
        {"filename": "clip.webm", "format": "video/webm", "type": "output"}]}})["filename"] == "clip.webm"
    saved = preview_of({"a": text_node})
    assert (saved["filename"], saved["mediaType"], saved["nodeId"]) == ("ComfyUI_00001.txt", "files", "a")
    raw = preview_of({"a": {"text": ["hello world"]}})
    assert raw == {"content": "hello world", "nodeId": "a", "mediaType": "text"}


def test_raw_text_preview_is_cut_to_1024_characters():
    assert preview_of({"a": {"text": ["x" * 1024]}}) == {"content": "x" * 1024, "nodeId": "a", "mediaType": "text"}
    cut = preview_of({"a": {"text": ["y" * 1025]}})
    assert cut["content"] == "y" * 1024 and cut["truncated"] is True
    assert preview_of({"a": {"text": [["from a tuple"]]}})["content"] == "from a tuple"


def test_a_3d_filename_string_becomes_a_saved_3d_preview():
    for ext in (".obj", ".fbx", ".gltf", ".glb", ".usdz"):
        preview = preview_of({"lat": {"latents": [{"filename": "l.latent"}]}, "n1": {"result": [f"p{ext}", None]}})
        assert preview == {"filename": f"p{ext}", "type": "output", "subfolder": "", "mediaType": "3d",
                           "nodeId": "n1"}
    assert preview_of({"n1": {"result": ["data.json", None]}}) is None


def test_preview_keeps_the_items_own_media_type_and_adds_the_node():
    preview = preview_of({"node123": {"images": [{"filename": "t.png", "type": "output", "subfolder": "s"}]}})
    assert preview == {"filename": "t.png", "type": "output", "subfolder": "s", "nodeId": "node123",
                       "mediaType": "images"}


# -- malformed entries --------------------------------------------------------------------
@pytest.mark.parametrize("mangle", [
    lambda e: e.pop("prompt"),
    lambda e: e.update(prompt=None),
    lambda e: e.update(prompt=[1, "p"]),
    lambda e: e["prompt"].__setitem__(3, None),
    lambda e: e["prompt"][3].update(extra_pnginfo=None),
    lambda e: e["prompt"][3].update(extra_pnginfo={"workflow": {"id": 12}}),
    lambda e: e.update(outputs=["not", "a", "dict"]),
    lambda e: e.update(outputs=None),
    lambda e: e.update(outputs={"n": {"images": [{"filename": 5, "format": 7}, 3, ("t",)]}}),
    lambda e: e.update(status="success"),
    lambda e: e["status"].update(messages="oops"),
    lambda e: e["status"].update(messages=[None, ["execution_start"], ["execution_start", "x"], 5]),
    lambda e: e["status"].update(messages=[["execution_start", {"timestamp": "noon"}],
                                           ["execution_success", {"timestamp": None}]]),
    lambda e: e["status"].update(execution_summary="weird"),
])
def test_a_malformed_entry_never_raises_and_keeps_a_numeric_create_time(mangle):
    e = entry(messages=[("execution_start", {"timestamp": 1}), ("execution_success", {"timestamp": 2})],
              outputs={"n": {"images": [{"filename": "a.png", "type": "output"}]}}, workflow_id="wf")
    mangle(e)
    for detail in (False, True):
        job = history_job("p", e, detail, create_time=42)
        assert job["id"] == "p" and job["status"] in STATUSES
        assert isinstance(job["create_time"], (int, float)) and not isinstance(job["create_time"], bool)
        for key in ("execution_start_time", "execution_end_time", "priority"):
            assert isinstance(job.get(key, 0), (int, float))
        assert isinstance(job.get("workflow_id", ""), str)
    assert history_job("p", None, create_time=9)["create_time"] == 9


# -- listing ------------------------------------------------------------------------------
def jobs_fixture():
    running = [queue_job(item(1, "run", 500, workflow_id="A"), "in_progress")]
    pending = [queue_job(item(2, "pend", 600), "pending")]
    history = [
        history_job("ok", entry(create_time=100, workflow_id="A",
                                messages=[("execution_start", {"timestamp": 110}),
                                          ("execution_success", {"timestamp": 5110})])),
        history_job("bad", entry("error", create_time=300,
                                 messages=[("execution_start", {"timestamp": 300}),
                                           ("execution_error", {"timestamp": 1300})])),
        history_job("stop", entry("error", create_time=200,
                                  messages=[("execution_start", {"timestamp": 200}),
                                            ("execution_interrupted", {"timestamp": 3200})])),
    ]
    return running + pending, history


def ids(body):
    return [j["id"] for j in body["jobs"]]


def test_list_filters_by_status_and_sorts_newest_first():
    queue, history = jobs_fixture()
    assert ids(list_jobs(queue, history, parse_query({}))) == ["pend", "run", "bad", "stop", "ok"]
    assert ids(list_jobs(queue, history, parse_query({"status": "in_progress,pending"}))) == ["pend", "run"]
    assert ids(list_jobs(queue, history, parse_query({"status": "cancelled,FAILED"}))) == ["bad", "stop"]
    assert ids(list_jobs(queue, history, parse_query({"status": "completed", "sort_order": "asc"}))) == ["ok"]
    assert ids(list_jobs(queue, history, parse_query({"status": ","}))) == []


def test_list_filters_by_workflow_id_exactly():
    queue, history = jobs_fixture()
    assert ids(list_jobs(queue, history, parse_query({"workflow_id": "A"}))) == ["run", "ok"]
    assert ids(list_jobs(queue, history, parse_query({"workflow_id": "a"}))) == []


def test_duration_sort_treats_a_missing_time_as_zero():
    queue, history = jobs_fixture()
    desc = list_jobs(queue, history, parse_query({"sort_by": "execution_duration"}))
    assert ids(desc)[:3] == ["ok", "stop", "bad"]  # 5000, 3000, 1000; queued jobs have none
    asc = list_jobs(queue, history, parse_query({"sort_by": "execution_duration", "sort_order": "asc"}))
    assert ids(asc) == ["run", "pend", "bad", "stop", "ok"]  # ties keep running, pending order
    half = {"id": "half", "status": "completed", "create_time": 1, "execution_start_time": 100}
    asc = list_jobs(queue, history + [half], parse_query({"sort_by": "execution_duration", "sort_order": "asc"}))
    assert ids(asc)[:3] == ["run", "pend", "half"]  # started, never ended: duration 0


def test_pagination_counts_before_the_page_and_says_whether_more_follow():
    queue, history = jobs_fixture()
    body = list_jobs(queue, history, parse_query({"limit": "2", "offset": "1"}))
    assert ids(body) == ["run", "bad"]
    assert body["pagination"] == {"offset": 1, "limit": 2, "total": 5, "has_more": True}
    last = list_jobs(queue, history, parse_query({"limit": "2", "offset": "3"}))
    assert ids(last) == ["stop", "ok"] and last["pagination"]["has_more"] is False
    beyond = list_jobs(queue, history, parse_query({"offset": "9"}))
    assert beyond == {"jobs": [], "pagination": {"offset": 9, "limit": None, "total": 5, "has_more": False}}
    clamped = list_jobs(queue, history, parse_query({"offset": "-4", "limit": "200", "status": "failed"}))
    assert clamped["pagination"] == {"offset": 0, "limit": 200, "total": 1, "has_more": False}


def test_listing_leaves_the_callers_lists_alone():
    queue, history = jobs_fixture()
    before = [j["id"] for j in queue]
    list_jobs(queue, iter(history), parse_query({"sort_order": "asc"}))
    assert [j["id"] for j in queue] == before
