"""Access in a real coordinator ComfyUI (issue 12, items 1-5 and 21): cross-site requests,
/lb/* while ComfyUI listens beyond localhost, the session cookie, live state only to
subscribed sockets, the coordinator's own files as attachments, and /lb/state."""
from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest

from tests.client import Client, invert_prompt
from tests.conftest import COORD_TOKEN
from tests.unit.test_access import SVG, assert_attachment, outward_address, upload

pytestmark = pytest.mark.real
EVIL = "http://evil.example"


async def test_cross_site_requests_to_the_coordinator_are_refused(coordinators):
    coord = coordinators["coord"]
    async with aiohttp.ClientSession() as s:
        for path in ("/prompt", "/api/prompt", "/interrupt", "/api/queue", "/free", "/api/jobs/cancel",
                     "/lb/backends", "/api/lb/backends", "/api/lb/scheduler/strategy/round_robin"):
            async with s.post(coord.url + path, data=json.dumps({"prompt": invert_prompt(),
                                                                  "name": "rogue", "host": "127.0.0.1", "port": 1}),
                              headers={"Origin": EVIL, "Content-Type": "text/plain"}) as r:
                assert r.status == 403, (path, r.status)
        async with s.get(coord.url + "/lb/backends") as r:
            assert "rogue" not in {b["name"] for b in (await r.json())["backends"]}
        async with s.post(coord.url + "/api/lb/backends", data=b"{}", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        # the coordinator's own page: same origin
        async with s.post(coord.url + "/api/prompt", json={"prompt": invert_prompt()},
                          headers={"Origin": coord.url}) as r:
            assert r.status == 200, await r.text()


async def test_lb_answers_only_this_machine_when_comfyui_listens_beyond_it(coordinators):
    coord = coordinators["coord"]  # --listen 0.0.0.0, no token
    outward = outward_address()
    if outward is None:
        pytest.skip("this machine has no address beyond loopback")
    async with aiohttp.ClientSession() as s:
        for path in ("/lb/backends", "/api/lb/status"):
            async with s.get(f"http://{outward}:{coord.port}{path}") as r:
                assert r.status == 403 and "auth.token" in (await r.json())["error"], path
            async with s.get(coord.url + path) as r:
                assert r.status == 200
        async with s.get(f"http://{outward}:{coord.port}/api/queue") as r:  # ComfyUI's own API: ComfyUI's rules
            assert r.status == 200
    assert "ComfyLB: /lb/* open to this machine only" in coord.log.read_text()


async def test_session_cookie_in_the_coordinator(coordinators):
    coord = coordinators["coord_auth"]
    assert "ComfyLB: /lb/* guarded by auth.token" in coord.log.read_text()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(coord.url + "/api/lb/status") as r:
            assert r.status == 401
        async with s.post(coord.url + "/api/lb/session", json={"token": COORD_TOKEN}) as r:
            assert r.status == 200
            paths = {c.split("Path=")[1].split(";")[0] for c in r.headers.getall("Set-Cookie")}
            assert paths == {"/lb", "/api/lb"}
        for path in ("/api/lb/status", "/lb/backends"):
            async with s.get(coord.url + path) as r:
                assert r.status == 200, path
        async with s.get(coord.url + "/api/settings") as r:
            assert COORD_TOKEN not in await r.text()


async def test_status_pushes_reach_only_subscribed_sockets(coordinators):
    coord = coordinators["coord"]
    async with Client(coord.url) as panel, Client(coord.url) as other:
        await panel.subscribe(headers={})
        await panel.wait_event("comfylb.status", lambda d: True, 10)
        await panel.run(invert_prompt("push"))  # changes what the snapshot shows
        await panel.wait_event("comfylb.status", lambda d: d["stats"]["totals"]["completed"] > 0, 10)
        await asyncio.sleep(0.5)
        assert not [t for t, _ in other.other if t == "comfylb.status"]


async def test_the_coordinators_own_files_are_attachments(coordinators):
    """Uploaded to the coordinator's ComfyUI (0.3.75 serves SVG inline) and viewed there."""
    coord = coordinators["coord"]
    name = f"evil-{uuid.uuid4().hex[:6]}.svg"
    async with aiohttp.ClientSession() as s:
        stored = await upload(s, coord.url + "/api", name, SVG)
        for prefix in ("", "/api"):
            async with s.get(f"{coord.url}{prefix}/view", params={"filename": stored["name"], "type": "input"}) as r:
                assert_attachment(r, name, "image/svg+xml")


async def test_lb_state_says_why_it_is_not_attached(coordinators):
    stock = coordinators["stock"]
    async with aiohttp.ClientSession() as s:
        for prefix in ("", "/api"):
            async with s.get(f"{stock.url}{prefix}/lb/state") as r:
                body = await r.json()
                assert r.status == 200 and body["attached"] is False, body
                assert body["reason"].startswith("no config at") and body["config"].endswith("stock-absent.yaml")
        async with s.get(coordinators["coord"].url + "/lb/state") as r:
            assert (await r.json())["attached"] is True
