"""One route table for both hosts: the same paths answered by the same handlers."""
from __future__ import annotations

import pytest

from comfylb_ext.api.comfy import ComfyApi
from comfylb_ext.config import parse
from comfylb_ext.hosts import comfyui
from comfylb_ext.hosts.standalone import build_app

BOTH = [("POST", "/prompt"), ("GET", "/prompt"), ("GET", "/queue"), ("POST", "/queue"), ("POST", "/interrupt"),
        ("GET", "/history"), ("GET", "/history/p1"), ("POST", "/history"), ("GET", "/view"),
        ("GET", "/object_info"), ("GET", "/object_info/KSampler"), ("GET", "/embeddings"), ("GET", "/models"),
        ("GET", "/models/checkpoints"), ("GET", "/system_stats"), ("POST", "/free"), ("GET", "/node_replacements")]
JOBS = [("GET", "/api/jobs"), ("GET", "/api/jobs/j1"), ("POST", "/api/jobs/j1/cancel"), ("POST", "/api/jobs/cancel")]
STANDALONE_ONLY = [("POST", "/upload/image"), ("POST", "/upload/mask"), ("GET", "/extensions"), ("GET", "/features")]


def extension_table():
    api = ComfyApi(None, None)  # the table is made without touching the cluster
    overrides = comfyui.Overrides(api, None, None).table()
    return comfyui.intercepts(api.routes(), overrides), overrides


@pytest.mark.parametrize("method,path", BOTH + JOBS)
def test_the_extension_answers_every_cluster_route_as_x_and_api_x(method, path):
    table, _ = extension_table()
    assert comfyui.match(table, method, path) is not None
    assert comfyui.match(table, method, "/api" + path) is not None


def test_the_extension_leaves_comfyuis_own_routes_to_comfyui():
    table, _ = extension_table()
    for method, path in STANDALONE_ONLY + [("GET", "/settings"), ("DELETE", "/queue"), ("GET", "/lb/state")]:
        assert comfyui.match(table, method, path) is None, path
        assert comfyui.match(table, method, "/api" + path) is None, path
    assert comfyui.match(table, "GET", "/jobs") is not None  # /api/jobs with its /api taken off, as before


def test_the_extension_answers_with_its_overrides_and_passes_path_parameters():
    table, overrides = extension_table()
    intercept, params = comfyui.match(table, "GET", "/api/object_info/KSampler")
    assert intercept == overrides[("GET", "/object_info/{node_class}")] and params == {"node_class": "KSampler"}
    intercept, params = comfyui.match(table, "GET", "/api/api/jobs/j1")
    assert intercept not in overrides.values() and params == {"job_id": "j1"}


def test_an_override_for_a_route_the_extension_does_not_serve_is_refused():
    api = ComfyApi(None, None)
    with pytest.raises(ValueError, match="/upload/image"):
        comfyui.intercepts(api.routes(), {("POST", "/upload/image"): comfyui.Overrides(api, None, None).free})


def test_the_standalone_host_answers_every_route_as_x_and_api_x(tmp_path):
    app = build_app(parse({"storage": {"dir": str(tmp_path)}}))
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    for route in ComfyApi(None, None).routes():
        assert {(route.method, route.path), (route.method, "/api" + route.path)} <= served, route.path
