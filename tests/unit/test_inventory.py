"""What each peer has and lacks (issue 15, items 2 and 4): the pure inventory, and the
/lb/backends/{name}/inventory and /lb/inventory routes over simulated and hostile peers."""
from __future__ import annotations

import asyncio
import json
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from comfylb_ext import catalog as catalog_module, inventory
from comfylb_ext.config import BackendConfig
from comfylb_ext.sim import catalog as sim_catalog
from tests.peers import answer, hostile_peer
from tests.simcluster import lb_over_sims, wait_for

TWO_CHECKPOINTS = [{"checkpoints": ["a.safetensors"]}, {"checkpoints": ["b.safetensors"]}]


def node(module):
    return {"input": {"required": {}}, "output": [], "python_module": module}


def test_packs_are_named_as_comfyui_names_them():
    assert inventory.pack_of("custom_nodes.ComfyUI-Impact-Pack") == "ComfyUI-Impact-Pack"
    assert inventory.pack_of("custom_nodes.ComfyUI-Impact-Pack.modules.impact.x") == "ComfyUI-Impact-Pack"
    for core in ("nodes", "comfy_extras.nodes_mask", "comfy_api_nodes.nodes_openai", "custom_nodes.", "custom_nodes",
                 None, 5, ["custom_nodes.x"], "custom_nodes.bad\x00name", "custom_nodes." + "x" * 600):
        assert inventory.pack_of(core) is None, core


def test_an_inventory_from_object_info_and_model_listings():
    info = {"KSampler": node("nodes"), "ImageBlur": node("comfy_extras.nodes_post_processing"),
            "SAMLoader": node("custom_nodes.ComfyUI-Impact-Pack"),
            "ImpactWildcard": node("custom_nodes.ComfyUI-Impact-Pack.modules.wildcards"),
            "KJNode": node("custom_nodes.comfyui-kjnodes")}
    inv = inventory.inventory(info, {"checkpoints": ["b.safetensors", "a.safetensors", "a.safetensors"],
                                     "loras": None, "vae": [], "custom_nodes": ["x/__init__.py"], "configs": ["a.yaml"]})
    assert inv == {"models": {"checkpoints": ["a.safetensors", "b.safetensors"], "vae": []},
                   "nodes": ["ImageBlur", "ImpactWildcard", "KJNode", "KSampler", "SAMLoader"],
                   "packs": ["ComfyUI-Impact-Pack", "comfyui-kjnodes"], "unlisted": ["loras"], "truncated": []}
    assert inventory.inventory(None, None) == {"models": None, "nodes": None, "packs": None, "unlisted": [],
                                               "truncated": []}


@pytest.mark.parametrize("info, listings", [
    ([1, 2], "checkpoints"), ("x", {"checkpoints": {"a": 1}}), ({"A": 5, "B": [], "C": {"python_module": 7}}, []),
    ({"A": {"python_module": {"custom_nodes.x": 1}}}, {5: ["a"], "": ["b"], "..": ["c"], "a/b": ["d"]}),
    ({"A": None}, {"checkpoints": [None, 1, 2.5, {"a": 1}, ["x"], "", "ok\n", "fine.safetensors"]}),
])
def test_odd_data_from_a_peer_yields_less_never_an_exception(info, listings):
    inv = inventory.inventory(info, listings)
    for files in (inv["models"] or {}).values():
        assert all(isinstance(f, str) and f for f in files)
    assert all(isinstance(n, str) for n in inv["nodes"] or [])
    assert inventory.lacks({"odd": inv, "fine": inventory.inventory({"K": node("nodes")}, {"checkpoints": ["x"]})})
    if isinstance(listings, dict) and "checkpoints" in listings and isinstance(listings["checkpoints"], list):
        assert inv["models"]["checkpoints"] == ["fine.safetensors"]
    if isinstance(listings, dict) and "a/b" in listings:  # folders that cannot be asked for by name are dropped
        assert inv["models"] == {}


def test_the_lists_are_bounded_and_say_so(monkeypatch):
    monkeypatch.setattr(inventory, "MAX_FILES", 10)
    monkeypatch.setattr(inventory, "MAX_NODES", 5)
    monkeypatch.setattr(inventory, "MAX_FOLDERS", 3)
    inv = inventory.inventory({f"N{i}": node("nodes") for i in range(50)},
                              {f"f{i}": [f"{i}-{j}.ckpt" for j in range(100)] for i in range(9)})
    assert len(inv["nodes"]) == 5 and set(inv["models"]) == {"f0", "f1", "f2"}
    assert all(len(files) == 10 for files in inv["models"].values())
    assert inv["truncated"] == ["nodes", "models/f0", "models/f1", "models/f2"]


def test_what_each_peer_lacks_against_the_union():
    a = inventory.inventory({"K": node("nodes"), "S": node("custom_nodes.Pack-A")},
                            {"checkpoints": ["a.safetensors", "shared.safetensors"], "loras": ["l1"]})
    b = inventory.inventory({"K": node("nodes")}, {"checkpoints": ["shared.safetensors", "b.safetensors"]})
    unknown = inventory.inventory(None, None)  # has not answered yet: lacks nothing known
    partly = inventory.inventory({"K": node("nodes"), "S": node("custom_nodes.Pack-A")},
                                 {"checkpoints": ["a.safetensors", "b.safetensors", "shared.safetensors"],
                                  "loras": None})
    out = inventory.lacks({"a": a, "b": b, "unknown": unknown, "partly": partly})
    assert out["a"]["lacks"] == {"models": {"checkpoints": ["b.safetensors"]}, "nodes": [], "packs": []}
    assert out["b"]["lacks"] == {"models": {"checkpoints": ["a.safetensors"], "loras": ["l1"]},
                                 "nodes": ["S"], "packs": ["Pack-A"]}
    assert out["b"]["missing"] == {"models": 2, "nodes": 1, "packs": 1} and out["b"]["unknown"] == []
    assert out["unknown"]["lacks"] == {"models": {}, "nodes": [], "packs": []}
    assert out["unknown"]["unknown"] == ["models", "nodes", "packs"]
    assert out["partly"]["lacks"]["models"] == {} and out["partly"]["unknown"] == ["models/loras"]
    hint = inventory.packs_hint("b", out["b"]["lacks"]["packs"])
    assert hint and "ComfyUI-Manager" in hint and "Pack-A" in hint and inventory.packs_hint("a", []) is None


def test_what_a_peer_lacks_is_listed_in_bounds_and_counted_in_full(monkeypatch):
    monkeypatch.setattr(inventory, "MAX_LISTED", 7)
    big = inventory.inventory({f"N{i}": node(f"custom_nodes.P{i}") for i in range(20)},
                              {"checkpoints": [f"c{i}" for i in range(5)], "loras": [f"l{i}" for i in range(5)]})
    out = inventory.lacks({"big": big, "empty": inventory.inventory({}, {})})["empty"]
    assert out["missing"] == {"models": 10, "nodes": 20, "packs": 20}
    assert sum(map(len, out["lacks"]["models"].values())) == 7
    assert len(out["lacks"]["nodes"]) == len(out["lacks"]["packs"]) == 7
    assert inventory.lacks({"x": "garbage", "y": {"models": {"f": [1, {}]}, "nodes": [[]], "packs": 3}})


# -- the routes -----------------------------------------------------------------------------

async def get(s: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict]:
    async with s.get(URL(url, encoded=True), **kw) as r:
        return r.status, await r.json()


async def known(cluster) -> None:
    await wait_for(lambda: all(p.object_info for p in cluster.peers.values() if not p.removed), cluster)


async def joined(cluster, name: str, port: int) -> None:
    """A peer added at runtime, linked, and every peer's catalog known."""
    cluster.add_peer(BackendConfig(name=name, port=port))
    await wait_for(lambda: cluster.peers[name].available, cluster)
    await known(cluster)


async def test_each_peer_lacks_the_checkpoint_only_the_other_has():
    async with lb_over_sims(2, sim_kw=TWO_CHECKPOINTS) as (url, sims, cluster):
        await known(cluster)
        async with aiohttp.ClientSession() as s:
            status, inv = await get(s, url + "/lb/backends/sim0/inventory")
            assert status == 200 and inv["name"] == "sim0"
            assert inv["models"] == {"checkpoints": ["a.safetensors"]}
            assert "CheckpointLoaderSimple" in inv["nodes"] and inv["packs"] == []
            status, body = await get(s, url + "/lb/inventory")
            assert status == 200
            lacks = body["backends"]
            assert lacks["sim0"]["lacks"] == {"models": {"checkpoints": ["b.safetensors"]}, "nodes": [], "packs": []}
            assert lacks["sim1"]["lacks"]["models"] == {"checkpoints": ["a.safetensors"]}
            assert lacks["sim1"]["missing"] == {"models": 1, "nodes": 0, "packs": 0}
            assert lacks["sim0"]["packs_hint"] is None


@pytest.mark.parametrize("name", ["nope", "..", "%2e%2e", "sim0%2F..", "a%2Fb", "%00", "sim0%20", "%C3%A4", "x" * 300,
                                  "sim0%3Fx=1", "%252e"])
async def test_an_unknown_or_odd_name_is_a_404_in_lbs_shape(name):
    async with lb_over_sims(1) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            async with s.get(URL(f"{url}/lb/backends/{name}/inventory", encoded=True)) as r:
                assert r.status == 404, (name, r.status)
                body = await r.json()
                assert set(body) == {"error"} and "no backend named" in body["error"]


async def test_the_inventory_routes_are_guarded():
    async with lb_over_sims(1, auth={"token": "s3cret"}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for path in ("/lb/inventory", "/lb/backends/sim0/inventory", "/lb/backends/nope/inventory"):
                async with s.get(url + path) as r:
                    assert r.status == 401, path
            async with s.get(url + "/lb/inventory", headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200 and "sim0" in (await r.json())["backends"]


def _slow(seconds: float):
    async def handler(request):
        await asyncio.sleep(seconds)
        return web.json_response(["late.safetensors"])
    return handler


GARBAGE_MODELS = [
    answer({"checkpoints": ["x"]}),  # an object where a list belongs
    answer("checkpoints"),
    answer([1, None, {"a": 1}, ["checkpoints"], "../../manager/reboot?", "..", "a/b", "x" * 5000, "checkpoints"]),
    answer(None, status=500),
    lambda request: web.Response(text="<html>not json</html>", content_type="text/html"),
    lambda request: web.Response(body=b"[" + b'"a",' * 400_000 + b'"a"]', content_type="application/json"),
]


@pytest.mark.parametrize("models", GARBAGE_MODELS)
async def test_a_peer_answering_garbage_for_models_breaks_no_one_else(models):
    async def folder(request):
        return web.json_response({"not": "a list"} if request.match_info["folder"] == "checkpoints" else [])

    async def route(request):  # aiohttp wants coroutines: the lambdas above are plain functions
        out = models(request)
        return await out if asyncio.iscoroutine(out) else out

    routes = {("GET", "/models"): route, ("GET", "/models/{folder}"): folder}
    async with hostile_peer(routes) as (port, seen):
        async with lb_over_sims(2, sim_kw=TWO_CHECKPOINTS) as (url, sims, cluster):
            await joined(cluster, "liar", port)
            async with aiohttp.ClientSession() as s:
                status, body = await get(s, url + "/lb/inventory")
                assert status == 200, body
                lacks = body["backends"]
                assert lacks["sim0"]["lacks"]["models"] == {"checkpoints": ["b.safetensors"]}
                assert lacks["sim1"]["lacks"]["models"] == {"checkpoints": ["a.safetensors"]}
                liar = lacks["liar"]
                assert liar["unknown"] in (["models"], ["models/checkpoints"]), liar
                status, inv = await get(s, url + "/lb/backends/liar/inventory")
                assert status == 200 and inv["models"] in (None, {}), inv
    assert not [p for p in seen if "manager" in unquote(p) or ".." in unquote(p).split("/")], seen


async def test_a_peer_that_stalls_on_a_folder_is_answered_for_in_time(monkeypatch):
    monkeypatch.setattr(catalog_module, "FOLDERS_WITHIN", 0.5)
    routes = {("GET", "/models"): answer(["checkpoints", "loras"]),
              ("GET", "/models/checkpoints"): answer(["sim-a.safetensors"]), ("GET", "/models/loras"): _slow(3600)}
    async with hostile_peer(routes) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            await joined(cluster, "slow", port)
            async with aiohttp.ClientSession() as s:
                status, inv = await asyncio.wait_for(get(s, url + "/lb/backends/slow/inventory"), 5)
    assert status == 200 and inv["models"] == {"checkpoints": ["sim-a.safetensors"]} and inv["unlisted"] == ["loras"]


async def test_listings_are_asked_once_until_the_catalog_changes_and_packs_get_a_hint(monkeypatch):
    info = {**sim_catalog([], ["sim-a.safetensors"]), "SAMLoader": node("custom_nodes.ComfyUI-Impact-Pack"),
            "Wildcard": node("custom_nodes.ComfyUI-Impact-Pack.modules.wildcards")}
    routes = {("GET", "/object_info"): answer(info), ("GET", "/models"): answer(["checkpoints"]),
              ("GET", "/models/{folder}"): answer(["sim-a.safetensors"])}
    async with hostile_peer(routes) as (port, seen):
        async with lb_over_sims(1) as (url, sims, cluster):
            await joined(cluster, "packed", port)
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    status, body = await get(s, url + "/lb/inventory")
                asked = [p for p in seen if p.startswith("/models")]
                assert asked == ["/models", "/models/checkpoints"], asked
                sim0 = body["backends"]["sim0"]
                assert sim0["lacks"]["packs"] == ["ComfyUI-Impact-Pack"]
                assert sim0["lacks"]["nodes"] == ["SAMLoader", "Wildcard"]
                assert "ComfyUI-Manager" in sim0["packs_hint"] and "ComfyUI-Impact-Pack" in sim0["packs_hint"]
                assert body["backends"]["packed"]["missing"] == {"models": 1, "nodes": 0, "packs": 0}
                cluster.peers["packed"].object_info = dict(info)  # as Catalog.refresh does when it changed
                await get(s, url + "/lb/inventory")
                assert len([p for p in seen if p.startswith("/models")]) == 4
                monkeypatch.setattr(catalog_module, "MODELS_FRESH", 0.0)  # too old: asked again
                await get(s, url + "/lb/inventory")
                assert len([p for p in seen if p.startswith("/models")]) == 6


# -- POST /lb/backends/{name}/models: what the route itself refuses ------------------------
COPY = {"folder": "checkpoints", "name": "a.safetensors", "from": "sim1"}
BAD_COPY_BODIES = [
    (b"[]", 400), (b'"x"', 400), (b"null", 400), (b"{", 400),
    (b'{"folder": NaN, "name": "a.safetensors", "from": "sim1"}', 400),
    (b'{"folder": "checkpoints", "name": "a.safetensors", "from": "sim1", "size": 1e999}', 400),
    (b'{"folder": ' + b"[" * 100 + b"]" * 100 + b', "name": "a.safetensors", "from": "sim1"}', 400),  # too deep
    (b'{"folder": "checkpoints", "name": "a.safetensors", "from": "sim1", "path": "../../x"}', 400),  # unknown field
    (b'{"folder": "' + b"x" * (9 << 20) + b'"}', 400),  # beyond the 8 MB of a JSON body
]


@pytest.mark.parametrize("body, status", BAD_COPY_BODIES, ids=range(len(BAD_COPY_BODIES)))
async def test_a_copy_request_the_route_cannot_read_is_refused_and_starts_nothing(body, status):
    async with lb_over_sims(2, auth={"agent_secret": "x" * 32}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/lb/backends/sim0/models", data=body,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == status and set(await r.json()) == {"error"}, r.status
            assert cluster.transfers.describe() == []


@pytest.mark.parametrize("name", ["nope", "..", "%2e%2e", "sim0%2F..", "%00", "x" * 300])
async def test_a_copy_to_an_unknown_or_odd_peer_name_is_a_404(name):
    async with lb_over_sims(2, auth={"agent_secret": "x" * 32}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            async with s.post(URL(f"{url}/lb/backends/{name}/models", encoded=True), json=COPY) as r:
                assert r.status == 404 and "no backend named" in (await r.json())["error"], name
            assert cluster.transfers.describe() == []


async def test_a_copy_request_from_another_site_or_not_as_json_is_refused():
    async with lb_over_sims(2, auth={"agent_secret": "x" * 32}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for origin in ("http://evil.example", "null", url.replace("127.0.0.1", "localhost")):
                async with s.post(url + "/lb/backends/sim0/models", json=COPY, headers={"Origin": origin}) as r:
                    assert r.status == 403, origin
            async with s.post(url + "/lb/backends/sim0/models", data=json.dumps(COPY),
                              headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 415
            async with s.post(url + "/lb/backends/sim0/models", json=COPY) as r:  # read, then refused:
                assert r.status == 409 and "agent" in (await r.json())["error"]  # sim0 runs no agent
            assert cluster.transfers.describe() == []
