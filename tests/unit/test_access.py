"""Access (issue 12, items 1-5): cross-site requests, default exposure, tokens, files
served as attachments, the panel's session cookie and who sees live state — over real
sockets against the standalone balancer on simulated peers."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from comfylb_ext.config import ConfigError, parse
from tests.client import Client, invert_prompt
from tests.procs import REPO, free_port, http_ok
from tests.simcluster import lb_over_sims, wait_for

EVIL = "http://evil.example"
ROGUE = {"name": "rogue", "host": "127.0.0.1", "port": 1}


def ws_url(url: str) -> str:
    return url.replace("http", "ws", 1) + "/ws?clientId=test"


# -- 1. cross-site requests ---------------------------------------------------------------
STATE_CHANGING = [
    ("POST", "/prompt"), ("POST", "/api/prompt"), ("POST", "/queue"), ("POST", "/interrupt"), ("POST", "/free"),
    ("POST", "/history"), ("POST", "/upload/image"), ("POST", "/upload/mask"), ("POST", "/api/jobs/cancel"),
    ("POST", "/api/jobs/x/cancel"), ("POST", "/userdata/x.json"), ("POST", "/settings/x"),
    ("POST", "/lb/backends"), ("DELETE", "/lb/backends/sim0"), ("POST", "/lb/backends/sim0/disable"),
    ("DELETE", "/lb/tasks/x"), ("POST", "/lb/health-check"), ("POST", "/lb/scheduler/strategy/round_robin"),
    ("POST", "/lb/session"), ("DELETE", "/lb/session"), ("POST", "/lb/subscribe"), ("PUT", "/prompt"),
    ("PATCH", "/lb/backends/sim0"), ("POST", "/lb/backends/sim0/models"), ("POST", "/lb/backends/sim0/restart"),
]


async def test_cross_site_requests_are_refused():
    async with lb_over_sims(1) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            # the attack from the review: a page elsewhere POSTs text/plain and adds a peer
            async with s.post(url + "/lb/backends", data=json.dumps(ROGUE),
                              headers={"Origin": EVIL, "Content-Type": "text/plain"}) as r:
                assert r.status == 403 and "Origin" in (await r.json())["error"]
            assert "rogue" not in cluster.peers
            for method, path in STATE_CHANGING:
                port = int(url.rsplit(":", 1)[1])
                for origin in (EVIL, "null", url.replace("127.0.0.1", "localhost"), f"http://127.0.0.1:{port + 1}",
                               "garbage", "http://127.0.0.1:x"):
                    async with s.request(method, url + path, data=b"{}", headers={"Origin": origin}) as r:
                        assert r.status == 403, (method, path, origin, r.status)
                        body = await r.json()
                        assert "Origin" in (body["error"] if path.startswith("/lb/") else body["error"]["message"])
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await s.ws_connect(ws_url(url), headers={"Origin": EVIL})
            assert refused.value.status == 403
            # reading is not changing anything: a GET from elsewhere is answered (the
            # browser keeps the answer from the other page: no CORS headers)
            async with s.get(url + "/queue", headers={"Origin": EVIL}) as r:
                assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
            # the same site, and clients that send no Origin (scripts), pass
            async with s.post(url + "/lb/scheduler/strategy/round_robin", headers={"Origin": url}) as r:
                assert r.status == 200
            async with s.post(url + "/lb/scheduler/strategy/least_busy") as r:
                assert r.status == 200
            async with s.post(url + "/prompt", json={"prompt": invert_prompt()},
                              headers={"Origin": url.upper().replace("HTTP", "http")}) as r:
                assert r.status == 200, await r.text()
            ws = await s.ws_connect(ws_url(url), headers={"Origin": url})
            assert (await ws.receive_json())["type"] == "status"
            await ws.close()


async def test_allowed_origins_are_configured():
    ui = "https://ui.example.org"
    async with lb_over_sims(1, server={"allowed_origins": [ui + "/"]}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for origin, status in ((ui, 200), ("HTTPS://UI.example.org", 200), (ui + ".evil.example", 403),
                                   ("http://ui.example.org", 403)):
                async with s.post(url + "/lb/scheduler/strategy/round_robin", headers={"Origin": origin}) as r:
                    assert r.status == status, origin
            ws = await s.ws_connect(ws_url(url), headers={"Origin": ui})
            await ws.close()


def test_allowed_origins_must_be_origins():
    assert parse({}).server.allowed_origins == []
    for bad in (["ui.example.org"], ["https://ui.example.org/app"], ["ftp://x.org"], "https://x.org", [""]):
        with pytest.raises(ConfigError) as e:
            parse({"server": {"allowed_origins": bad}})
        assert e.value.field.startswith("server.allowed_origins")


async def test_lb_json_endpoints_need_a_json_content_type():
    async with lb_over_sims(1) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
                headers = {"Content-Type": ctype} if ctype else {}
                async with s.post(url + "/lb/backends", data=json.dumps(ROGUE).encode(), headers=headers,
                                  skip_auto_headers=["Content-Type"]) as r:
                    assert r.status == 415 and "Content-Type" in (await r.json())["error"], ctype
            assert "rogue" not in cluster.peers
            async with s.post(url + "/lb/backends", json=ROGUE) as r:
                assert r.status == 201


async def test_prompt_keeps_accepting_json_without_a_content_type():
    """ComfyUI's example scripts POST with urllib and no Content-Type."""
    async with lb_over_sims(1) as (url, sims, cluster):
        async with Client(url) as c:
            body = json.dumps({"prompt": invert_prompt(), "client_id": c.client_id}).encode()
            async with c.session.post(url + "/prompt", data=body, skip_auto_headers=["Content-Type"]) as r:
                assert r.status == 200, await r.text()


# -- 2. default exposure -----------------------------------------------------------------
def test_the_default_is_loopback():
    from comfylb_ext.config import Config

    assert Config().server.host == parse({}).server.host == "127.0.0.1"


def test_exposure_rule():
    from comfylb_ext.access import exposure_problem

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert exposure_problem(parse({"server": {"host": host}})) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.20", "gpu-box.lan"):
        problem = exposure_problem(parse({"server": {"host": host}}))
        assert problem and "auth.api_token" in problem and "allow_open" in problem and "\n" not in problem, host
        assert exposure_problem(parse({"server": {"host": host}, "auth": {"token": "t"}})) is None
        assert exposure_problem(parse({"server": {"host": host}, "auth": {"api_token": "t"}})) is None
        assert exposure_problem(parse({"server": {"host": host}, "auth": {"allow_open": True}})) is None


def test_exposure_rule_takes_tokens_from_the_environment(monkeypatch):
    from comfylb_ext.access import exposure_problem

    cfg = parse({"server": {"host": "0.0.0.0"}})
    for var in ("COMFYLB_TOKEN", "COMFYLB_API_TOKEN"):
        monkeypatch.setenv(var, "t")
        assert exposure_problem(cfg) is None
        monkeypatch.delenv(var)


def test_listen_beyond_loopback():
    from comfylb_ext.access import listens_beyond_loopback

    assert not listens_beyond_loopback("127.0.0.1")
    assert not listens_beyond_loopback("127.2.2.2,127.3.3.3")
    assert not listens_beyond_loopback("localhost,::1")
    assert listens_beyond_loopback("0.0.0.0,::")      # plain --listen
    assert listens_beyond_loopback("127.0.0.1,192.168.1.5")


def test_exposed_without_a_token_refuses_to_start(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage: {{dir: {tmp_path / 'data'}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYLB_")}
    argv = [sys.executable, "-m", "comfylb_ext", "-c", str(cfg), "-H", "0.0.0.0", "-p", str(free_port())]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("it started, listening on every address without a token")
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert "0.0.0.0" in lines[0] and "auth.api_token" in lines[0] and "COMFYLB_API_TOKEN" in lines[0]
    assert "allow_open" in lines[0]


@pytest.mark.parametrize("how", ["env", "allow_open"])
def test_exposed_with_a_token_or_allow_open_starts(tmp_path, how):
    import time

    port = free_port()
    cfg = tmp_path / "c.yaml"
    open_on_purpose = "auth: {allow_open: true}\n" if how == "allow_open" else ""
    cfg.write_text(f"storage: {{dir: {tmp_path / 'data'}}}\n" + open_on_purpose)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYLB_")}
    if how == "env":
        env["COMFYLB_API_TOKEN"] = "t0ken"
    proc = subprocess.Popen([sys.executable, "-m", "comfylb_ext", "-c", str(cfg), "-H", "0.0.0.0", "-p", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not http_ok(f"http://127.0.0.1:{port}/lb/state") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    if how == "env":
        assert "/lb/* guarded by COMFYLB_API_TOKEN" in err and "ComfyUI's API guarded by COMFYLB_API_TOKEN" in err
    else:
        assert "OPEN to anyone who can reach" in err


def outward_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


async def test_extension_rule_lb_answers_only_this_machine():
    """In ComfyUI listening beyond loopback without a token, /lb/* answers loopback only."""
    from comfylb_ext.access import Access
    from comfylb_ext.api.lb import LbApi

    outward = outward_address()
    if outward is None:
        pytest.skip("this machine has no address beyond loopback")
    async with lb_over_sims(1) as (url, sims, cluster):
        app = web.Application()
        for method, path, handler in LbApi(cluster, Access(loopback_only=True)).routes():
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "0.0.0.0", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://{outward}:{port}/lb/backends") as r:
                    error = (await r.json())["error"]
                    assert r.status == 403 and "auth.token" in error and "this machine" in error
                async with s.post(f"http://{outward}:{port}/lb/backends", json=ROGUE) as r:
                    assert r.status == 403
                async with s.get(f"http://127.0.0.1:{port}/lb/backends") as r:
                    assert r.status == 200
                async with s.get(f"http://{outward}:{port}/lb/state") as r:  # says why, never a secret
                    assert r.status == 200
        finally:
            await runner.cleanup()


# -- 4. files served as attachments --------------------------------------------------------
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>fetch("/lb/backends")</script></svg>'
ACTIVE = {"x.svg": "image/svg+xml", "x.html": "application/octet-stream", "x.htm": "application/octet-stream",
          "x.xhtml": "application/octet-stream", "x.xml": None, "x.xsl": None, "x.js": "application/octet-stream",
          "x.css": "application/octet-stream", "x.svgz": None, "x.pdf": None}


def assert_attachment(r: aiohttp.ClientResponse, name: str, ctype: str | None = None) -> None:
    assert r.status == 200, name
    assert r.headers["Content-Disposition"].startswith("attachment;"), (name, r.headers)
    assert name.rsplit("/", 1)[-1] in r.headers["Content-Disposition"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    if ctype:
        assert r.headers["Content-Type"].split(";")[0] == ctype, (name, r.headers["Content-Type"])
    assert "html" not in r.headers["Content-Type"] and "javascript" not in r.headers["Content-Type"]


async def upload(s: aiohttp.ClientSession, url: str, name: str, data: bytes, typ: str = "input") -> dict:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name)
    form.add_field("type", typ)
    async with s.post(url + "/upload/image", data=form) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_active_uploads_are_attachments():
    async with lb_over_sims(1) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for name, ctype in ACTIVE.items():
                stored = await upload(s, url, name, SVG)
                async with s.get(url + "/view", params={"filename": stored["name"], "type": "input"}) as r:
                    assert_attachment(r, name, ctype)
            await upload(s, url, "ok.png", b"\x89PNG\r\n\x1a\n")
            async with s.get(url + "/api/view", params={"filename": "ok.png", "type": "input"}) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "image/png"
                assert not r.headers["Content-Disposition"].startswith("attachment")  # shown inline, as ComfyUI
                assert r.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("cache_mb", [2048, 0])
async def test_active_outputs_from_peers_are_attachments(cache_mb):
    """Relayed from the peer, followed while copied, then from the coordinator's copy:
    the peer's own headers (inline SVG here) never reach the client."""
    storage = {"dir": tempfile.mkdtemp(prefix="comfylb-unit-"), "view_cache_mb": cache_mb}
    async with lb_over_sims(1, storage=storage) as (url, sims, cluster):
        peer = cluster.peers["sim0"]
        folder = sims[0].sim.root / "output" / "sim0"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "evil.svg").write_bytes(SVG)
        (folder / "page.html").write_bytes(b"<script>alert(1)</script>")
        cluster.outputs.record(peer, {"images": [{"filename": n, "subfolder": "sim0", "type": "output"}
                                                 for n in ("evil.svg", "page.html")]}, fresh=True)
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # the first view takes the copy, the second is served from it
                for name, ctype in (("evil.svg", "image/svg+xml"), ("page.html", "application/octet-stream")):
                    async with s.get(url + "/view", params={"filename": name, "subfolder": "sim0"}) as r:
                        assert_attachment(r, name, ctype)
                        assert await r.read() == (folder / name).read_bytes()
                await wait_for(lambda: not cluster.outputs.copies.inflight, cluster)
            async with s.get(url + "/view", params={"filename": "evil.svg", "subfolder": "sim0",
                                                    "channel": "rgb"}) as r:  # relayed as it is
                assert_attachment(r, "evil.svg")


async def test_forwarded_files_are_attachments():
    """Userdata a peer answers for the standalone balancer: the same rule, whatever the
    peer says (a hostile one here, serving an SVG inline)."""
    from comfylb_ext.config import parse_backend

    async def userdata(request: web.Request) -> web.Response:
        return web.Response(body=SVG, content_type="image/svg+xml", headers={"Content-Disposition": "inline"})
    app = web.Application()
    app.router.add_get("/api/userdata/{name}", userdata)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with lb_over_sims(1) as (url, sims, cluster):
            cluster.add_peer(parse_backend({"name": "hostile", "port": runner.addresses[0][1]}))
            cluster.cfg.server.forward_to = "hostile"
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/api/userdata/evil.svg") as r:
                    assert_attachment(r, "evil.svg", "image/svg+xml")
                    assert await r.read() == SVG
    finally:
        await runner.cleanup()


# -- 4. the panel's session cookie ---------------------------------------------------------
def cookie_jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # keep cookies for an IP address host


async def test_session_cookie_logs_the_panel_in_and_out():
    async with lb_over_sims(1, auth={"token": "s3cret"}) as (url, sims, cluster):
        async with aiohttp.ClientSession(cookie_jar=cookie_jar()) as s:
            async with s.get(url + "/lb/status") as r:
                assert r.status == 401
            async with s.post(url + "/lb/session", json={"token": "s3cret"}) as r:
                assert r.status == 200
                cookies = r.headers.getall("Set-Cookie")
            # /lb/* and the page's /ws (the extension: /lb and /api/lb, test_panel.py)
            assert {c.split("Path=")[1].split(";")[0] for c in cookies} == {"/lb", "/ws"}
            for c in cookies:
                low = c.lower()
                assert "httponly" in low and "samesite=strict" in low and "s3cret" not in c
            for path in ("/lb/status", "/lb/backends"):
                async with s.get(url + path) as r:
                    assert r.status == 200, path
            async with s.get(url + "/lb/status", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 200  # the cookie is enough; a stale header does not undo it
            async with s.delete(url + "/lb/session") as r:
                assert r.status == 200
            async with s.get(url + "/lb/status") as r:
                assert r.status == 401
        async with aiohttp.ClientSession(cookie_jar=cookie_jar()) as s:  # a cookie made up by hand
            s.cookie_jar.update_cookies({"comfylb_session": "s3cret"})
            async with s.get(url + "/lb/status") as r:
                assert r.status == 401


async def test_session_bad_input():
    async with lb_over_sims(1, auth={"token": "s3cret"}) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for body, status in ((b"", 400), (b"not json", 400), (b"[]", 400), (b"{}", 400),
                                 (b'{"token": 5}', 400), (b'{"token": null}', 400), (b'{"token": "wrong"}', 401),
                                 ('{"token": "s3crét"}'.encode(), 401), (b'{"token": "\\udcff"}', 401),
                                 (b'{"token": "' + b"x" * 100_000 + b'"}', 401), (b"{" * 5000, 400)):
                async with s.post(url + "/lb/session", data=body, headers={"Content-Type": "application/json"}) as r:
                    assert r.status == status, (body[:40], r.status)
                    assert "error" in await r.json()
                    assert "Set-Cookie" not in r.headers
            async with s.post(url + "/lb/session", data=b'{"token": "s3cret"}',
                              headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 415
    async with lb_over_sims(1) as (url, sims, cluster):  # no token: nothing to log in to
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/lb/session", json={"token": "x"}) as r:
                assert r.status == 409 and "auth.token" in (await r.json())["error"]


# -- 5. live state reaches only sockets allowed to read it -------------------------------
async def test_status_push_reaches_only_subscribed_sockets():
    auth = {"Authorization": "Bearer s3cret"}
    async with lb_over_sims(1, auth={"token": "s3cret"}) as (url, sims, cluster):
        async with Client(url) as admin, Client(url) as stranger:
            status, body = await stranger.post("/lb/subscribe", {"client_id": stranger.client_id})
            assert status == 401
            await admin.subscribe(headers=auth)
            await admin.wait_event("comfylb.status", lambda d: True, 5)  # the current state at once
            async with admin.session.post(url + "/lb/backends/sim0/disable", headers=auth) as r:
                assert r.status == 200
            await admin.wait_event("comfylb.status", lambda d: d["backends"][0]["enabled"] is False, 5)
            await asyncio.sleep(0.3)
            assert not [t for t, _ in stranger.other if t == "comfylb.status"]


async def test_a_subscription_belongs_to_one_socket():
    """A later socket under the same clientId (anyone may open one) is not subscribed."""
    async with lb_over_sims(1) as (url, sims, cluster):  # /lb/* open: the page subscribes without a token
        async with Client(url) as first:
            await first.subscribe()
            await first.wait_event("comfylb.status", lambda d: True, 5)
            async with Client(url, client_id=first.client_id) as second:
                cluster.set_enabled("sim0", False)
                await first.wait_event("comfylb.status", lambda d: d["backends"][0]["enabled"] is False, 5)
                await asyncio.sleep(0.3)
                assert not [t for t, _ in second.other if t == "comfylb.status"]


async def test_subscribe_bad_input():
    async with lb_over_sims(1) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for body, status in ((b"", 400), (b"nope", 400), (b"[]", 400), (b"{}", 400), (b'{"client_id": 5}', 400),
                                 (b'{"client_id": ""}', 400), (b'{"client_id": "' + b"x" * 300 + b'"}', 400),
                                 (b'{"client_id": "nobody"}', 404)):
                async with s.post(url + "/lb/subscribe", data=body, headers={"Content-Type": "application/json"}) as r:
                    assert r.status == status, (body, r.status)
                    assert "error" in await r.json()


async def test_view_token_is_not_forwarded_to_the_peer():
    async with lb_over_sims(1, auth={"api_token": "s3cret"}) as (url, sims, cluster):
        peer = cluster.peers["sim0"]
        (sims[0].sim.root / "temp").mkdir(parents=True, exist_ok=True)
        (sims[0].sim.root / "temp" / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        cluster.outputs.record(peer, {"images": [{"filename": "t.png", "subfolder": "", "type": "temp"}]}, fresh=True)
        asked: list[str] = []
        opened = peer.open_stream

        async def recording(method, path, **kw):
            asked.append(path)
            return await opened(method, path, **kw)
        peer.open_stream = recording
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/view", params={"filename": "t.png", "type": "temp", "token": "s3cret",
                                                    "Token": "keep"}) as r:
                assert r.status == 200
        assert asked and all("s3cret" not in p for p in asked), asked
        assert "filename=t.png" in asked[0] and "Token=keep" in asked[0]


# -- the new routes, swept like every other (test_bad_input.py) -------------------------------
from hypothesis import given, strategies as st  # noqa: E402

from tests.unit.test_bad_input import SETTINGS, alive, check, json_values, lb  # noqa: E402,F401

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                      max_size=60).map(str.strip)


@SETTINGS
@given(body=json_values, raw=st.binary(max_size=100), ctype=header_text, origin=header_text, auth=header_text)
def test_session_and_subscribe_never_fail(lb, body, raw, ctype, origin, auth):
    import requests

    for path in ("/lb/session", "/lb/subscribe"):
        check(requests.post(lb + path, json=body, timeout=10))
        check(requests.post(lb + path, data=raw, headers={"Content-Type": ctype, "Origin": origin,
                                                          "Authorization": auth}, timeout=10))
        check(requests.delete(lb + path, headers={"Origin": origin, "Authorization": auth}, timeout=10))
    check(requests.get(lb + "/lb/state", headers={"Authorization": auth, "Cookie": f"comfylb_session={origin}"},
                       timeout=10))
    alive(lb)
