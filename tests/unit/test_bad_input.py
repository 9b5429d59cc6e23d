"""Malformed requests on every route: a clear 4xx (ComfyUI's error shape on its routes),
never a 500, and the service keeps answering.  Property-based, over simulated peers."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.simcluster import lb_over_sims

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
path_text = st.sampled_from(["", ".", "..", "../x", "/etc/passwd", "a/../../b", "sub", "x.png", "x.png [output]",
                             "\x00", "ä ü", "a" * 300, "C:\\w", "%2e%2e"]) | st.text(max_size=30)
ids = st.text(max_size=40) | st.sampled_from(["", "..", "%00", "a/b"])


@pytest.fixture(scope="module")
def lb():
    """The balancer over two simulated peers, served from a thread so sync tests can hit it."""
    ready = threading.Event()
    box: dict = {}

    async def serve():
        async with lb_over_sims(2, max_queue=2, queue={"max_size": 50}) as (url, sims, cluster):
            box["url"] = url
            box["stop"] = asyncio.Event()
            ready.set()
            await box["stop"].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(20)
    yield box["url"]
    loop.call_soon_threadsafe(box["stop"].set)
    thread.join(20)


def check(r: requests.Response, comfy_shape: bool = False) -> None:
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:300])
    if comfy_shape and r.status_code == 400 and r.headers.get("Content-Type", "").startswith("application/json"):
        body = r.json()
        assert set(body) == {"error", "node_errors"} and {"type", "message"} <= set(body["error"])


def alive(url: str) -> None:
    assert requests.get(url + "/prompt", timeout=10).status_code == 200


@SETTINGS
@given(body=json_values, client_id=json_values)
def test_post_prompt_any_json(lb, body, client_id):
    check(requests.post(lb + "/prompt", json=body, timeout=10), comfy_shape=True)
    check(requests.post(lb + "/api/prompt", json={"prompt": body, "client_id": client_id}, timeout=10),
          comfy_shape=True)


node = st.fixed_dictionaries({"class_type": st.sampled_from(["EmptyImage", "SaveImage", "ImageInvert", "LoadImage",
                                                            "Nope", "ComfyLBRoute"]) | json_values},
                             optional={"inputs": st.dictionaries(st.text(max_size=12), json_values, max_size=4)})


@SETTINGS
@given(prompt=st.dictionaries(st.text(max_size=3), node, max_size=4), extra=json_values,
       number=json_values, front=json_values, pid=json_values, targets=json_values)
def test_post_prompt_graph_shapes(lb, prompt, extra, number, front, pid, targets):
    body = {"prompt": prompt, "extra_data": extra, "number": number, "front": front, "prompt_id": pid,
            "partial_execution_targets": targets}
    check(requests.post(lb + "/prompt", json=body, timeout=10), comfy_shape=True)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_raw_bodies_everywhere(lb, raw):
    for path in ("/prompt", "/queue", "/history", "/interrupt", "/lb/backends", "/upload/image", "/upload/mask",
                 "/api/prompt", "/api/queue"):
        check(requests.post(lb + path, data=raw, timeout=10), comfy_shape=path.endswith("prompt"))


@SETTINGS
@given(body=json_values)
def test_queue_history_interrupt_json(lb, body):
    for path in ("/queue", "/history", "/interrupt", "/lb/backends"):
        check(requests.post(lb + path, json=body, timeout=10))


@SETTINGS
@given(max_items=st.text(max_size=6), offset=st.text(max_size=6), pid=ids)
def test_history_reads(lb, max_items, offset, pid):
    check(requests.get(lb + "/history", params={"max_items": max_items, "offset": offset}, timeout=10))
    check(requests.get(lb + "/history/" + requests.utils.quote(pid, safe=""), timeout=10))


@SETTINGS
@given(filename=path_text, subfolder=path_text, typ=st.sampled_from(["output", "input", "temp", "bogus", ""]),
       preview=st.sampled_from([None, "webp;50", "jpeg", "x;y"]), channel=st.sampled_from([None, "rgb", "a", "zz"]))
def test_view_params(lb, filename, subfolder, typ, preview, channel):
    params = {"filename": filename, "subfolder": subfolder, "type": typ}
    if preview:
        params["preview"] = preview
    if channel:
        params["channel"] = channel
    check(requests.get(lb + "/view", params=params, timeout=10))


@SETTINGS
@given(filename=path_text, subfolder=path_text, typ=path_text, overwrite=st.sampled_from(["true", "1", "no", ""]),
       data=st.binary(max_size=64), ref=json_values)
def test_uploads(lb, filename, subfolder, typ, overwrite, data, ref):
    files = {"image": (filename or "x", data)}
    form = {"subfolder": subfolder, "type": typ, "overwrite": overwrite}
    check(requests.post(lb + "/upload/image", files=files, data=form, timeout=10))
    check(requests.post(lb + "/upload/mask", files=files, data={**form, "original_ref": json.dumps(ref)}, timeout=10))


@SETTINGS
@given(name=ids, state=st.text(max_size=10), limit=st.text(max_size=5), offset=st.text(max_size=5), strategy=ids)
def test_lb_routes(lb, name, state, limit, offset, strategy):
    q = requests.utils.quote(name, safe="")
    check(requests.get(lb + "/lb/tasks", params={"state": state, "limit": limit, "offset": offset}, timeout=10))
    for method, path in (("GET", f"/lb/tasks/{q}"), ("DELETE", f"/lb/tasks/{q}"), ("GET", f"/lb/backends/{q}"),
                         ("DELETE", f"/lb/backends/{q}"), ("POST", f"/lb/backends/{q}/enable"),
                         ("POST", f"/lb/backends/{q}/disable"),
                         ("POST", f"/lb/scheduler/strategy/{requests.utils.quote(strategy, safe='')}"),
                         ("POST", f"/lb/scheduler/order/{requests.utils.quote(strategy, safe='')}")):
        if method == "DELETE" and path.startswith("/lb/backends/") and name in ("sim0", "sim1"):
            continue
        check(requests.request(method, lb + path, timeout=10))


@SETTINGS
@given(first=st.binary(max_size=64) | st.text(max_size=64), client_id=st.text(max_size=20))
def test_websocket_garbage(lb, first, client_id):
    import websocket

    ws = websocket.create_connection(lb.replace("http", "ws", 1) + "/ws?" + requests.compat.urlencode(
        {"clientId": client_id}), timeout=10)
    try:
        hello = json.loads(ws.recv())
        assert hello["type"] == "status"
        (ws.send_binary if isinstance(first, bytes) else ws.send)(first)
    finally:
        ws.close()
    alive(lb)


def test_huge_body_is_refused_not_crashed(lb):
    r = requests.post(lb + "/prompt", data=b"x" * (101 * 1024 * 1024), timeout=60)
    assert r.status_code == 413
    alive(lb)


def test_still_alive_after_the_sweep(lb):
    alive(lb)
    r = requests.get(lb + "/lb/status", timeout=10)
    assert r.status_code == 200 and len(r.json()["backends"]) == 2
