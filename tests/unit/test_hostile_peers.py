"""Peers and clients that lie, stall or send too much: nothing they do reaches another
peer's routes or files, breaks the cluster for everyone, or holds memory.

Each hostile peer is a small aiohttp server (tests/peers.py `hostile_peer`), added to a
balancer over simulated peers at runtime."""
from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from comfylb_ext import capability, jsonsafe, peer as peer_module, routing, validation
from comfylb_ext.config import BackendConfig
from comfylb_ext.outputs import claimable
from comfylb_ext.peer import PeerError, checked_path, clean_system_stats
from comfylb_ext.sim import catalog as sim_catalog
from tests.client import Client, sleep_prompt
from tests.peers import answer, hostile_peer
from tests.simcluster import lb_over_sims, wait_for


def strict_json(text: str | bytes):
    """json.loads as a browser parses: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} in JSON")
    return json.loads(text, parse_constant=refuse)


async def add(cluster, name: str, port: int, available: bool = True, **kw):
    cluster.add_peer(BackendConfig(name=name, port=port, **kw))
    if available:
        await wait_for(lambda: cluster.peers[name].available, cluster)
    return cluster.peers[name]


# -- 6. peer-request forgery ----------------------------------------------------------------

FORGED = ["/userdata/../manager/reboot", "/userdata/%2e%2e/manager/reboot", "/userdata/%2E%2E/%2e%2e/manager/reboot",
          "/userdata/..%2fmanager%2freboot", "/api/userdata/../../manager/reboot", "/userdata/./../manager/reboot",
          "/settings/..%5c..%5cmanager", "/i18n/x%2f..%2f..%2fmanager/reboot"]


def test_nothing_that_resolves_into_another_route_reaches_a_peer():
    for path in FORGED + ["/models/../../manager/reboot?", "/history/..%2F..%2Fmanager%2Freboot%3F",
                          "//evil.example/x", "http://evil.example/x", "/x/%23/../y", "/a\r\nHost: x"]:
        with pytest.raises(PeerError):
            checked_path(path)
    for path in ("/userdata/workflows%2Fmy%20flow.json", "/view?filename=a..b.png&subfolder=x", "/history/" + str(uuid.uuid4()),
                 "/models/checkpoints", "/userdata/..foo", "/api/jobs?status=in_progress,pending"):
        assert checked_path(path) == path
    assert checked_path("/view?filename=a#b.png&type=output") == "/view?filename=a%23b.png&type=output"


async def test_forwarded_routes_reach_only_the_route_they_name():
    """ComfyLB answers /userdata, /settings, … by asking one peer: a `..` in any spelling
    made it ask another of that peer's routes (with the peer's credentials)."""
    async with hostile_peer() as (port, seen):
        async with lb_over_sims(1, server={"forward_to": "fwd"}) as (url, sims, cluster):
            await add(cluster, "fwd", port)
            async with aiohttp.ClientSession() as s:
                for path in FORGED:
                    async with s.get(URL(url + path, encoded=True)) as r:
                        assert r.status < 500, path
                async with s.get(URL(url + "/api/userdata/workflows%2Fmy%20flow.json", encoded=True)) as r:
                    assert r.status == 200
    reached = [unquote(p) for p in seen if not p.startswith(("/ws", "/system_stats", "/object_info",
                                                             "/node_replacements", "/api/jobs"))]
    assert not [p for p in reached if "manager" in p or ".." in p.split("/")], reached
    # an encoded slash stays one: the peer's /userdata/{file} route gets its file name
    assert "/api/userdata/workflows%2Fmy%20flow.json" in seen


async def test_a_peer_listing_a_forged_model_folder_does_not_reach_other_routes():
    async def models(request):
        return web.json_response(["checkpoints", "../../manager/reboot?", "..%2F..%2Fmanager"])

    async with hostile_peer({("GET", "/models"): models}) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            await add(cluster, "liar", port)
            async with aiohttp.ClientSession() as s:
                for folder in ("../../manager/reboot?", "..%2F..%2Fmanager"):
                    async with s.get(URL(url + "/models/" + folder.replace("/", "%2F").replace("?", "%3F"),
                                         encoded=True)) as r:
                        assert r.status < 500
    assert not [p for p in seen if "manager" in unquote(p).split("/")[1:2] or "/manager" in unquote(p)], seen


async def test_a_masks_original_ref_reaches_the_peer_as_checked():
    got: list[str] = []

    async def upload_mask(request):
        post = await request.post()
        got.append(post["original_ref"])
        return web.json_response({"name": "m.png", "subfolder": "comfylb-masks", "type": "temp"})

    async def view(request):
        return web.Response(body=b"\x89PNG composited")

    async with hostile_peer({("POST", "/upload/mask"): upload_mask, ("GET", "/view"): view}) as (port, seen):
        async with lb_over_sims(0) as (url, sims, cluster):
            await add(cluster, "masker", port)
            async with aiohttp.ClientSession() as s:
                form = aiohttp.FormData()
                form.add_field("image", b"\x89PNG base", filename="base.png")
                async with s.post(url + "/upload/image", data=form) as r:
                    assert r.status == 200
                for ref, status in (('{"filename": "base.png", "filename": "base.png", "type": "input"}', 200),
                                    ('{"filename": "base.png", "subfolder": "../../etc"}', 400),
                                    ('{"filename": "../secret.png"}', 400),
                                    ('{"filename": "base.png", "type": "bogus"}', 400),
                                    ('[' * 5000 + ']' * 5000, 400)):
                    form = aiohttp.FormData()
                    form.add_field("image", b"\x89PNG mask", filename="mask.png")
                    form.add_field("original_ref", ref)
                    async with s.post(url + "/upload/mask", data=form) as r:
                        assert r.status == status, (ref[:60], r.status, await r.text())
    assert got == ['{"filename": "base.png", "subfolder": "", "type": "input"}']


# -- 7. output hijack -------------------------------------------------------------------------

def test_a_filename_prefix_stays_in_its_peers_folder():
    for prefix, confined in (("ComfyUI", "p1/ComfyUI"), ("../p2/victim", "p1/p2/victim"), ("/p2/victim", "p1/p2/victim"),
                             ("..\\p2\\victim", "p1/p2/victim"), ("a/../../p2/victim", "p1/a/p2/victim"),
                             ("%2e%2e/p2/victim", "p1/%2e%2e/p2/victim"), ("p1/x", "p1/x"), ("", "p1/ComfyUI"),
                             ("... /p2/v", "p1/p2/v"), ("p1", "p1/p1")):
        assert routing.confined_prefix(prefix, "p1") == confined, prefix
    assert not claimable("p1", ("output", "p2", "x.png"))
    assert not claimable("p1", ("output", "p1/../p2", "x.png"))
    assert not claimable("p1", ("output", "p1\\..\\p2", "x.png"))
    assert not claimable("p1", ("output", "p1", "../p2/x.png"))
    assert not claimable("p1", ("input", "", "photo.png"))
    assert not claimable("p1", ("temp", "", "t.png"), holder="p2")
    assert claimable("p1", ("output", "p1/sub", "x.png")) and claimable("p1", ("temp", "", "t.png"))


async def _view(c: Client, **params) -> bytes:
    status, body = await c.get("/view", params=params)
    assert status == 200, (params, status)
    return body


@pytest.mark.parametrize("prefix", ["../sim0/victim", "a/../../sim0/victim", "sim1/../sim0/victim"])
async def test_a_prompt_cannot_overwrite_another_peers_output(prefix):
    async with lb_over_sims(2, storage={"view_cache_mb": 0}) as (url, sims, cluster):
        async with Client(url) as c:
            victim = sleep_prompt(0, prefix="victim")
            victim["9"] = {"class_type": "ComfyLBRoute", "inputs": {"target": "sim0"}}
            run = await c.run(victim)
            image = run.first("executed")["output"]["images"][0]
            assert image["subfolder"] == "sim0"
            before = await _view(c, **image)
            attack = sleep_prompt(0, prefix=prefix)
            attack["9"] = {"class_type": "ComfyLBRoute", "inputs": {"target": "sim1"}}
            run = await c.run(attack)
            assert "execution_success" in run.types(), run.messages
            theirs = run.first("executed")["output"]["images"][0]
            assert theirs["subfolder"].startswith("sim1/"), theirs
            assert cluster.outputs.holder("output", "sim0", image["filename"]) == "sim0"
            assert await _view(c, **image) == before


async def test_a_peer_cannot_claim_another_peers_file_or_an_upload_or_a_taken_temp_name():
    """A prefix that comes through a link is known only to the peer: what it reports is
    checked instead."""
    async with lb_over_sims(2, storage={"view_cache_mb": 0}) as (url, sims, cluster):
        async with Client(url) as c:
            form = aiohttp.FormData()
            form.add_field("image", b"\x89PNG the user's own", filename="photo.png")
            async with c.session.post(url + "/upload/image", data=form) as r:
                assert r.status == 200
            victim = sleep_prompt(0, prefix="victim")
            victim["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
            victim["9"] = {"class_type": "ComfyLBRoute", "inputs": {"target": "sim0"}}
            run = await c.run(victim)
            saved = {d["node"]: d["output"]["images"][0] for t, d in run.messages if t == "executed"}
            image, temp = saved["3"], saved["4"]
            originals = [await _view(c, **image), await _view(c, **temp)]

            hostile = sims[1].sim
            honest = hostile.run_node

            async def lying(nid, node, pid, sid, state):
                out = await honest(nid, node, pid, sid, state)
                if node["class_type"] == "SaveImage":
                    return {"images": [dict(image), {"filename": "photo.png", "subfolder": "", "type": "input"},
                                       {"filename": image["filename"], "subfolder": "sim1/../sim0", "type": "output"},
                                       dict(temp), {"filename": 5, "subfolder": [], "type": {}}]}
                return out
            hostile.run_node = lying
            attack = sleep_prompt(0, prefix="x")
            attack["9"] = {"class_type": "ComfyLBRoute", "inputs": {"target": "sim1"}}
            run = await c.run(attack)
            assert "execution_success" in run.types(), run.messages
            assert cluster.outputs.holder(*(image[k] for k in ("type", "subfolder", "filename"))) == "sim0"
            assert cluster.outputs.holder("input", "", "photo.png") is None
            assert cluster.outputs.holder(temp["type"], temp["subfolder"], temp["filename"]) == "sim0"
            assert [await _view(c, **image), await _view(c, **temp)] == originals
            assert await _view(c, filename="photo.png", type="input") == b"\x89PNG the user's own"


# -- 10. one bad peer breaks no one --------------------------------------------------------------

BAD_OBJECT_INFO = [[1, 2], "nope", {"EmptyImage": 5}, {"EmptyImage": {"input": [1]}},
                   {"EmptyImage": {"input": {"required": {"width": ["INT", {"min": "x"}]}}}, "SaveImage": []},
                   {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [[{"a": 1}], {}]}}}},
                   {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": ["COMBO", {"options": 7}]}}}}]


@pytest.mark.parametrize("first", [False, True], ids=["after", "first"])
@pytest.mark.parametrize("info", BAD_OBJECT_INFO, ids=range(len(BAD_OBJECT_INFO)))
async def test_a_malformed_object_info_from_one_disabled_peer_breaks_no_prompt(info, first):
    async with hostile_peer({("GET", "/object_info"): answer(info)}) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            bad = await add(cluster, "bad", port, enabled=False, available=False)
            await wait_for(lambda: bad.linked, cluster)
            await cluster.catalog.refresh(bad)
            if first:  # its definitions come first in the cluster's catalog
                cluster.peers["sim0"] = cluster.peers.pop("sim0")
            cluster.catalog.invalidate()
            async with Client(url) as c:
                run = await c.run(sleep_prompt(0))
                assert "execution_success" in run.types()
                prompt = {"7": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sim-a.safetensors"}},
                          **sleep_prompt(0)}
                status, body = await c.post("/prompt", {"prompt": prompt})
                assert status == 200, body
                assert (await c.get("/object_info"))[0] == 200


@pytest.mark.parametrize("stats", [{"devices": "x"}, {"devices": [1, None]}, {"system": 5, "devices": [{"a": 1}, 2]},
                                   {"system": [], "devices": {"a": 1}}, {}])
async def test_a_malformed_system_stats_from_one_peer_breaks_no_ones_system_stats(stats):
    async with hostile_peer({("GET", "/system_stats"): answer(stats)}) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            await add(cluster, "bad", port)
            async with Client(url) as c:
                status, body = await c.get("/system_stats")
                assert status == 200 and isinstance(body["system"], dict)
                assert [d["peer"] for d in body["devices"]] == ["sim0"]
                assert (await c.get("/lb/status"))[0] == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
node_names = st.sampled_from(["EmptyImage", "SaveImage", "TestSleep", "CheckpointLoaderSimple", "X"])
object_infos = json_values | st.dictionaries(node_names, json_values | st.fixed_dictionaries(
    {"input": json_values | st.dictionaries(st.sampled_from(["required", "optional"]), json_values |
                                            st.dictionaries(st.sampled_from(["ckpt_name", "width", "image"]),
                                                            json_values))},
    optional={"output": json_values, "output_node": json_values}), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(info=object_infos)
def test_any_peer_catalog_is_quarantined_or_survived(info):
    """What the cluster does with one peer's /object_info, for any JSON: refused as a
    whole (object_info_problem), or merged, checked against and validated with, never an
    exception."""
    good = sim_catalog([], ["sim-a.safetensors"])
    if capability.object_info_problem(info) is not None:
        return
    info, _ = capability.usable_classes(info)
    merged = capability.merge_catalogs([info, good])
    capability.merge_catalogs([good, info])
    caps = capability.Capabilities(info)
    prompt = {"7": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sim-a.safetensors"}},
              **sleep_prompt(0)}
    req = capability.requirements(prompt)
    caps.can_run(req), caps.lacks(req)
    capability.unrunnable(req, {"bad": caps})
    validation.validate(prompt, merged, None, lambda name: False)


# -- 11. hostile and stalled peers -----------------------------------------------------------------

async def test_a_huge_websocket_frame_loses_the_link_without_being_buffered():
    """A frame announcing 1 GiB: refused from its header (max_msg_size), not read into memory."""
    async def ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        request.transport.write(b"\x82\x7f" + (1 << 30).to_bytes(8, "big") + b"x" * 65536)  # binary, 1 GiB
        await asyncio.Event().wait()

    async with hostile_peer(ws=ws) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            peer = await add(cluster, "big", port, available=False)
            await wait_for(lambda: peer.link_error is not None and "1009" in peer.link_error, cluster)
            async with Client(url) as c:
                assert "execution_success" in (await c.run(sleep_prompt(0))).types()


async def test_a_peer_that_stops_reading_and_never_answers_a_ping_loses_its_link(monkeypatch):
    monkeypatch.setattr(peer_module, "HEARTBEAT", 0.2)
    accepted = asyncio.Event()

    async def ws(request):
        sock = web.WebSocketResponse(autoping=False)
        await sock.prepare(request)
        await sock.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}})
        request.transport.pause_reading()  # reads nothing more: no ping is ever answered
        accepted.set()
        await asyncio.Event().wait()

    async with hostile_peer(ws=ws) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            peer = await add(cluster, "deaf", port, available=False)
            await asyncio.wait_for(accepted.wait(), 10)
            # it still answers its health checks; the link is lost all the same
            await wait_for(lambda: peer.link_error is not None and "PONG" in peer.link_error, cluster)


async def test_an_oversized_answer_is_refused_before_it_is_read():
    sent = {"bytes": 0}

    async def huge(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 200 << 20  # declared: refused at once
        await resp.prepare(request)
        chunk = b" " * (1 << 20)
        for _ in range(200):
            await resp.write(chunk)
            sent["bytes"] += len(chunk)
        return resp

    async def chunked(request):  # not declared: refused once past the limit
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"[")
        for _ in range(200):
            await resp.write(b"1," * (1 << 19))
        await resp.write(b"1]")
        return resp

    async with hostile_peer({("GET", "/object_info"): huge, ("GET", "/models"): chunked}) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            peer = await add(cluster, "huge", port)
            with pytest.raises(PeerError, match="bytes"):
                await peer.get_json("/object_info")
            assert sent["bytes"] < 200 << 20
            with pytest.raises(PeerError, match="larger than"):
                await peer.get_json("/models")
            assert peer.object_info is None
            async with Client(url) as c:
                assert (await c.get("/object_info"))[0] == 200
                assert (await c.get("/models"))[1] == ["checkpoints"]
                assert "execution_success" in (await c.run(sleep_prompt(0))).types()


async def test_a_peer_answering_with_nan_deep_or_odd_json_breaks_nothing():
    deep = "[" * 5000 + "]" * 5000

    async def stats(request):
        return web.Response(text='{"system": {}, "devices": [{"name": "x", "vram_free": NaN}]}',
                            content_type="application/json")

    async def ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        for text in ('{"type": "progress", "data": {"value": NaN, "max": Infinity, "prompt_id": "x"}}', deep,
                     '{"type": "status", "data": 1e999}', "not json", "[1, 2]", '{"type": 5}',
                     '{"type": "progress", "data": {"prompt_id": [1], "value": 1}}',
                     '{"type": "executed", "data": {"prompt_id": {"a": 1}, "output": 5}}'):
            await sock.send_str(text)
        for meta in (b'{"prompt_id": [1]}', deep.encode(), b"{", b'{"prompt_id": NaN}'):
            await sock.send_bytes((4).to_bytes(4, "big") + len(meta).to_bytes(4, "big") + meta + b"\x89PNG")
        await sock.send_bytes(b"\0\0")
        # every message above was taken in turn without breaking the link: it ends only here
        await sock.close(code=4000, message=b"that was all")
        return sock

    async def history(request):
        return web.Response(text=deep, content_type="application/json")

    routes = {("GET", "/system_stats"): stats, ("GET", "/history/{pid}"): history,
              ("GET", "/object_info"): history}
    async with hostile_peer(routes, ws=ws) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            peer = cluster.add_peer(BackendConfig(name="odd", port=port))
            await wait_for(lambda: "4000" in str(peer.link_error) and peer.checks > 0, cluster)
            assert not peer.available  # NaN in /system_stats: not JSON, a failed check
            with pytest.raises(PeerError):
                await peer.get_json("/history/x")
            async with Client(url) as c:
                for path in ("/lb/status", "/system_stats", "/object_info", "/queue", "/history"):
                    async with c.session.get(url + path) as r:
                        assert r.status == 200, path
                        strict_json(await r.read())


def test_system_stats_devices_must_be_a_list_of_objects():
    assert clean_system_stats({"devices": [{"a": 1}, 2]})["devices"] == []
    assert clean_system_stats({"devices": "x", "system": 5}) == {"devices": [], "system": {}}
    assert clean_system_stats({"devices": [{"a": 1}]})["devices"] == [{"a": 1}]


def test_bounded_json():
    assert jsonsafe.loads("[" * 64 + "]" * 64)
    for raw, reason in (("[" * 65 + "]" * 65, "depth"), ("[" * 100000 + "]" * 100000, "depth"),
                        ('{"a": NaN}', "number"), ("[Infinity]", "number"), ("[-Infinity]", "number"),
                        ("[1e999]", "number"), ("[" + "1," * 1000 + "1]", "items"), ('["a", ' * 600 + "1" + "]" * 600,
                                                                                    "items"),
                        ("{", "syntax"), (b"\xff", "syntax")):
        with pytest.raises(jsonsafe.JSONError) as e:
            jsonsafe.loads(raw, max_items=1000 if reason == "items" else jsonsafe.MAX_ITEMS)
        assert e.value.reason == reason, raw[:20]
    # brackets, quotes and backslashes inside strings are text, not structure
    text = '{"a": "[[[[ \\" [[[[ \\\\", "b": ["]]]]{{"]}'
    assert jsonsafe.loads(text, max_depth=2) == json.loads(text)
    assert jsonsafe.dumps({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'
    assert jsonsafe.depth({"a": [[1]]}) == 3 and jsonsafe.depth(5) == 0
