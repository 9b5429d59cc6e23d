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
                         ("POST", f"/lb/backends/{q}/disable"), ("GET", f"/lb/backends/{q}/inventory"),
                         ("GET", f"/lb/backends/{q}/log"), ("POST", f"/lb/backends/{q}/restart"),
                         ("POST", f"/lb/backends/{q}/models"), ("GET", "/lb/transfers"),
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


# -- deep, huge and non-finite bodies (jsonsafe's limits) ----------------------------------------

def strict(text: bytes | str):
    """JSON as a browser reads it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} in an answer")
    return json.loads(text, parse_constant=refuse)


def nested(depth: int, leaf="x") -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


def deep_prompt(depth: int) -> str:
    """A valid prompt whose one extra input is nested `depth` levels deep inside the body."""
    return ('{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, '
            '"color": 1, "extra": ' + nested(depth - 4) + '}}, "2": {"class_type": "SaveImage", "inputs": '
            '{"images": ["1", 0], "filename_prefix": "deep"}}}}')


def check_answers_stay_json(url: str) -> None:
    for path in ("/queue", "/history", "/lb/status", "/system_stats", "/prompt", "/api/jobs"):
        r = requests.get(url + path, timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        strict(r.content)


def test_deep_bodies_are_refused_in_comfyuis_shape_and_history_still_answers(lb):
    """~970 deep was accepted, and GET /history then answered 500 for everyone (and the
    state database could not be loaded again)."""
    ok = requests.post(lb + "/prompt", data=deep_prompt(30), timeout=30)
    assert ok.status_code == 200, ok.text[:300]
    for depth in (65, 970, 5000, 100_000):
        for path in ("/prompt", "/api/prompt"):
            r = requests.post(lb + path, data=deep_prompt(depth), timeout=30)
            check(r, comfy_shape=True)
            assert r.status_code == 400 and "deep" in r.json()["error"]["message"], (depth, r.text[:200])
        for path in ("/queue", "/history", "/interrupt", "/free", "/api/jobs/cancel", "/upload/mask"):
            check(requests.post(lb + path, data=nested(depth), headers={"Content-Type": "application/json"},
                                timeout=30))
        check(requests.post(lb + "/lb/backends", data=nested(depth), headers={"Content-Type": "application/json"},
                            timeout=30))
    check_answers_stay_json(lb)


VALID = ('"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}}, '
         '"2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "n"}}')
SLEEP = ('{"prompt": {"1": {"class_type": "TestSleep", "inputs": {"value": 1, "seconds": %s}}, '
         '"2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "n"}}}}')


@pytest.mark.parametrize("body", [
    *('{"prompt": {%s}, "number": %s}' % (VALID, n)
      for n in ("NaN", "Infinity", "-Infinity", "1e999", '"nan"', '"-inf"', "1" + "0" * 400)),
    *(SLEEP % s for s in ("NaN", "Infinity", '"inf"', '"NaN"', "1e400")),
])
def test_non_finite_numbers_are_refused_and_every_answer_stays_json(lb, body):
    assert requests.post(lb + "/prompt", data=SLEEP % "0", timeout=30).status_code == 200  # the same, finite
    r = requests.post(lb + "/prompt", data=body, timeout=30)
    check(r, comfy_shape=True)
    assert r.status_code == 400, r.text[:300]
    strict(r.content)
    check_answers_stay_json(lb)


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "1e999", '"nan"'])
def test_a_non_finite_peer_weight_is_refused(lb, weight):
    body = '{"name": "w%d", "host": "127.0.0.1", "port": 9, "weight": %s}' % (len(weight), weight)
    r = requests.post(lb + "/lb/backends", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    check_answers_stay_json(lb)  # whatever happened, /lb/status stays JSON
    if r.status_code == 201:
        requests.delete(lb + f"/lb/backends/w{len(weight)}", timeout=30)
    assert r.status_code == 400, r.text[:200]


def test_a_prompt_over_the_size_limit_is_refused_before_it_is_read(lb):
    from comfylb_ext.jsonsafe import MAX_PROMPT_BYTES

    big = b'{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"x": "' + b"a" * MAX_PROMPT_BYTES + b'"}}}}'
    r = requests.post(lb + "/prompt", data=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"] == "Request body too large"
    r = requests.post(lb + "/prompt", data=iter([big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]),
                      timeout=60)  # chunked: no Content-Length to refuse it by
    assert r.status_code == 413 and set(r.json()) == {"error", "node_errors"}
    many = '{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"x": [' + "0," * 1_100_000 + '0]}}}}'
    r = requests.post(lb + "/prompt", data=many, timeout=60)
    check(r, comfy_shape=True)
    assert r.status_code == 400 and "values" in r.json()["error"]["message"]
    alive(lb)


DEEP_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@DEEP_SETTINGS
@given(depth=st.integers(min_value=1, max_value=20_000), leaf=json_values, opener=st.sampled_from(["[", '{"a":']),
       path=st.sampled_from(["/prompt", "/api/prompt", "/queue", "/history", "/interrupt", "/free",
                             "/api/jobs/cancel", "/lb/backends"]))
def test_any_nesting_on_any_route(lb, depth, leaf, opener, path):
    closer = "]" if opener == "[" else "}"
    body = opener * depth + json.dumps(leaf) + closer * depth
    for data in (body, '{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"a": ' + body + "}}}}"):
        r = requests.post(lb + path, data=data, headers={"Content-Type": "application/json"}, timeout=30)
        check(r, comfy_shape=path.endswith("prompt"))
        if path.endswith("prompt") and depth > 64:
            assert r.status_code == 400


HUGE_SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HUGE_SETTINGS
@given(size=st.integers(min_value=1 << 20, max_value=40 << 20),
       filler=st.sampled_from([b"a", b"[]", b"1,", b'"x",', b"\\", b"{}"]),
       path=st.sampled_from(["/prompt", "/queue", "/history", "/free", "/lb/backends", "/upload/mask"]))
def test_huge_bodies_on_any_route(lb, size, filler, path):
    body = b'{"prompt": ' + filler * (size // len(filler)) + b"}"
    check(requests.post(lb + path, data=body, headers={"Content-Type": "application/json"}, timeout=60),
          comfy_shape=path.endswith("prompt"))
    alive(lb)


def test_still_alive_after_the_sweep(lb):
    alive(lb)
    r = requests.get(lb + "/lb/status", timeout=10)
    assert r.status_code == 200 and len(r.json()["backends"]) == 2


@SETTINGS
@given(name=ids, body=json_values, raw=st.sampled_from([b"[" * 5000, b'{"folder": NaN}', b"{" * 3 + b"}",
                                                        b'{"name": "' + b"x" * 2_000_000 + b'"}', b"\xff\xfe"]))
def test_copy_requests(lb, name, body, raw):
    """POST /lb/backends/{name}/models with any JSON, and with bodies no JSON reader should
    take (deep, NaN, huge, not UTF-8): a 4xx, and no copy starts (the simulated peers run no
    agent, so none could)."""
    q = requests.utils.quote(name, safe="")
    check(requests.post(f"{lb}/lb/backends/{q}/models", json=body, timeout=10))
    check(requests.post(lb + "/lb/backends/sim0/models", json=body, timeout=10))
    r = requests.post(lb + "/lb/backends/sim0/models", data=raw, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert requests.get(lb + "/lb/transfers", timeout=10).json() == {"transfers": []}
