"""The agent (agent.py) on a plain aiohttp app over temporary model folders: only signed
requests reach it, it lists and serves model files, and what it receives lands whole and
verified, or stays hidden to resume, or leaves nothing; untrusted names write nothing."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from comfylb_ext import agent
from comfylb_ext.agent import PARTIAL, Agent

SECRET = "unit-agent-secret-0123456789"
EXTS = {".safetensors", ".ckpt"}
FILE = "/lb/agent/file"
WAIT = 30  # seconds: a guard against hanging, never a synchronisation
CHUNK = 1 << 16  # what the agent writes at once, here
CUT = 3 * CHUNK  # where a body stops: all of it written before the connection breaks


def model_bytes(tag: str, size: int = 300_000) -> bytes:
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            out[os.path.relpath(os.path.join(dirpath, f), root)] = Path(dirpath, f).read_bytes()
    return out


async def body(*parts: bytes):
    """A streamed (chunked) body of `parts`."""
    for p in parts:
        yield p


async def staged(served: Served, chunks: list[bytes], then=None):
    """A streamed body: each chunk (CHUNK bytes) once the agent wrote the one before, so
    that none waits unread in aiohttp's buffers (a broken connection loses those); then
    what `then()` returns, or raises (the connection breaks)."""
    sent = 0
    for c in chunks:
        yield c
        sent += len(c)
        while await asyncio.wait_for(served.written.get(), WAIT) < sent:
            pass
    if then is not None:
        yield await then()


async def give_up() -> bytes:
    raise ConnectionResetError("the sender gave up")


@dataclass
class Served:
    url: str
    agent: Agent
    root: Path
    ckpt: Path
    cl: Path
    session: aiohttp.ClientSession
    received: asyncio.Queue  # (status, JSON) of every PUT the agent answered, even to a sender gone
    asked: asyncio.Queue     # (method, path) of every request, as its handler starts
    written: asyncio.Queue   # the size of a partial file each time the agent wrote to it

    async def call(self, method: str, path: str, query: dict | None = None, data=None, headers: dict | None = None,
                   sign: dict | None = None):
        """The request signed with SECRET (`sign` overrides what is signed: method, path,
        query, secret; late: seconds it was signed ago; header=None sends none)."""
        query = {k: str(v) for k, v in (query or {}).items()}
        s = {"secret": SECRET, "method": method, "path": path, "query": query, "late": 0, **(sign or {})}
        value = s.get("header", agent.sign(s["secret"], s["method"], s["path"], s["query"], time.time() - s["late"]))
        hdrs = {**({agent.HEADER: value} if value is not None else {}), **(headers or {})}
        async with self.session.request(method, self.url + path, params=query, data=data, headers=hdrs) as r:
            raw = await r.read()
            return r.status, json.loads(raw) if r.content_type == "application/json" else raw

    async def put(self, folder: str, name: str, data, size: int, digest: str | None = None, offset: int = 0):
        query = {"folder": folder, "name": name, "size": size, "offset": offset, **({"sha256": digest} if digest else {})}
        return await self.call("PUT", FILE, query, data=data, headers={"Content-Type": "application/octet-stream"})


@pytest.fixture
async def served(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "CHUNK", CHUNK)  # several writes to disk per body
    loop, written = asyncio.get_running_loop(), asyncio.Queue()
    write = agent._write

    def watched(out, hasher, data):
        write(out, hasher, data)
        loop.call_soon_threadsafe(written.put_nowait, out.tell())
    monkeypatch.setattr(agent, "_write", watched)
    ckpt, cn, cl, configs = tmp_path / "ckpt", tmp_path / "cn", tmp_path / "cl", tmp_path / "configs"
    for d in (ckpt, cn, cl, configs):
        d.mkdir()
    # as ComfyUI's folder_paths has them: custom_nodes lists any file, configs YAML files
    a = Agent(SECRET, folders=lambda: {"checkpoints": ([str(ckpt)], set(EXTS)), "custom_nodes": ([str(cn)], set()),
                                       "configs": ([str(configs)], {".yaml"}), "classifiers": ([str(cl)], {""})})
    received: asyncio.Queue = asyncio.Queue()
    asked: asyncio.Queue = asyncio.Queue()

    @web.middleware
    async def record(request, handler):
        asked.put_nowait((request.method, request.path))  # and the handler starts in this same step
        response = await handler(request)
        if request.method == "PUT":
            received.put_nowait((response.status, json.loads(response.body)))
        return response

    app = web.Application(middlewares=[record])
    a.add_to(app.router)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    async with aiohttp.ClientSession() as session:
        yield Served(f"http://127.0.0.1:{runner.addresses[0][1]}", a, tmp_path, ckpt, cl, session, received,
                     asked, written)
    await runner.cleanup()


def hidden(folder: Path) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.startswith("."))


def test_the_agent_needs_a_secret():
    with pytest.raises(ValueError, match="agent_secret"):
        Agent("", folders=dict)
    assert Agent(SECRET, folders=dict).secret == SECRET


# -- signing --------------------------------------------------------------------------------

MISSIGNED = {
    "unsigned": {"header": None},
    "garbage": {"header": "not-a-signature"},
    "wrong secret": {"secret": "another-secret-0123456789"},
    "stale": {"late": agent.SKEW + 60},
    "from the future": {"late": -agent.SKEW - 60},
    "other query": {"query": {"folder": "checkpoints", "name": "other.safetensors"}},
    "other method": {"method": "DELETE"},
    "other path": {"path": "/lb/agent/file/data"},
    "not ASCII digits": {"header": "\u00b2" * 10 + ".x"},   # str.isdigit() takes these; int() does not
    "not ASCII MAC": {"header": f"{int(time.time())}.{'é' * 64}"},  # hmac.compare_digest raises on these
}


@pytest.mark.parametrize("how", list(MISSIGNED))
async def test_requests_not_signed_for_exactly_what_they_ask_are_refused(served, how):
    data = model_bytes("a")
    (served.ckpt / "a.safetensors").write_bytes(data)
    q = {"folder": "checkpoints", "name": "a.safetensors"}
    assert (await served.call("GET", FILE, q))[0] == 200  # signed right, the same request is answered
    status, answer = await served.call("GET", FILE, q, sign=MISSIGNED[how])
    assert status == 401 and "agent_secret" in answer["error"]
    before = tree(served.root)
    status, _ = await served.call("PUT", FILE, {"folder": "checkpoints", "name": "b.safetensors", "size": len(data)},
                                  data=data, sign=MISSIGNED[how])
    assert status == 401 and tree(served.root) == before


# -- listing and serving --------------------------------------------------------------------

async def test_listing_has_sizes_and_hashes_once_known(served):
    a, b, c = model_bytes("a", 1000), model_bytes("b", 2000), model_bytes("c", 30)
    (served.ckpt / "a.safetensors").write_bytes(a)
    (served.ckpt / "sd15").mkdir()
    (served.ckpt / "sd15" / "b.ckpt").write_bytes(b)
    (served.cl / "model").write_bytes(c)
    for other in ("notes.txt", ".hidden.safetensors", f".c.safetensors{PARTIAL}"):  # ComfyUI lists none of these
        (served.ckpt / other).write_bytes(b"x")
    status, hello = await served.call("GET", "/lb/agent", {"nonce": "n1"})
    assert status == 200 and hello == {"agent": agent.VERSION, "folders": ["checkpoints", "classifiers"],
                                       "proof": agent.proof(SECRET, "n1")}
    assert agent.proof(SECRET, "n1") != agent.proof(SECRET, "n2") != agent.proof("x" * 16, "n2")
    status, listing = await served.call("GET", "/lb/agent/models")
    assert status == 200 and listing["folders"] == {
        "checkpoints": [{"name": "a.safetensors", "size": 1000, "sha256": None},
                        {"name": "sd15/b.ckpt", "size": 2000, "sha256": None}],
        "classifiers": [{"name": "model", "size": 30, "sha256": None}]}

    q = {"folder": "checkpoints", "name": "a.safetensors"}
    assert await served.call("GET", FILE, {**q, "hash": "0"}) == (200, {**q, "size": 1000, "sha256": None})
    assert await served.call("GET", FILE, q) == (200, {**q, "size": 1000, "sha256": sha(a)})
    assert await served.call("GET", FILE, {**q, "hash": "0"}) == (200, {**q, "size": 1000, "sha256": sha(a)})
    _, listing = await served.call("GET", "/lb/agent/models")
    assert [f["sha256"] for f in listing["folders"]["checkpoints"]] == [sha(a), None]
    status, answer = await served.call("GET", FILE, {"folder": "checkpoints", "name": "absent.safetensors"})
    assert status == 404 and "not on this peer" in answer["error"]


async def test_file_data_is_served_whole_or_from_a_range(served):
    data = model_bytes("d", 100_000)
    (served.ckpt / "d.safetensors").write_bytes(data)
    q = {"folder": "checkpoints", "name": "d.safetensors"}
    assert await served.call("GET", FILE + "/data", q) == (200, data)
    assert await served.call("GET", FILE + "/data", q, headers={"Range": "bytes=1000-1999"}) == (206, data[1000:2000])
    assert await served.call("GET", FILE + "/data", q, headers={"Range": "bytes=99000-"}) == (206, data[99000:])


# -- receiving ------------------------------------------------------------------------------

async def test_a_whole_file_lands_in_place_verified_and_then_exists(served):
    data = model_bytes("w")
    status, answer = await served.put("checkpoints", "sd15/w.safetensors", data, len(data), sha(data))
    assert status == 201 and answer == {"folder": "checkpoints", "name": "sd15/w.safetensors", "size": len(data),
                                        "sha256": sha(data)}
    assert (served.ckpt / "sd15" / "w.safetensors").read_bytes() == data and hidden(served.ckpt / "sd15") == []
    # known without hashing again
    q = {"folder": "checkpoints", "name": "sd15/w.safetensors", "hash": "0"}
    assert (await served.call("GET", FILE, q))[1]["sha256"] == sha(data)

    # the same file again: already there; another one of that name: refused, the file unchanged
    for digest in (sha(data), None):
        status, answer = await served.put("checkpoints", "sd15/w.safetensors", data, len(data), digest)
        assert status == 200 and answer["exists"] is True and answer["sha256"] == sha(data)
    other = model_bytes("other")
    for size, digest in ((len(other), sha(other)), (len(data) + 1, None)):
        status, answer = await served.put("checkpoints", "sd15/w.safetensors", other, size, digest)
        assert status == 409 and "different file" in answer["error"]
    assert (served.ckpt / "sd15" / "w.safetensors").read_bytes() == data and hidden(served.ckpt / "sd15") == []


async def test_without_a_sha256_the_agent_says_what_it_received(served):
    data = model_bytes("n")
    status, answer = await served.put("checkpoints", "n.safetensors", data, len(data))
    assert status == 201 and answer["sha256"] == sha(data)
    assert (served.ckpt / "n.safetensors").read_bytes() == data and hidden(served.ckpt) == []


async def test_a_wrong_sha256_leaves_nothing(served):
    data = model_bytes("x")
    status, answer = await served.put("checkpoints", "x.safetensors", data, len(data), sha(b"something else"))
    assert status == 400 and sha(data) in answer["error"]
    assert os.listdir(served.ckpt) == []


@pytest.mark.parametrize("bad", [{"size": 0}, {"size": -5}, {"size": "many"}, {"size": agent.MAX_MODEL + 1},
                                 {"offset": 11}, {"sha256": "ABC"}, {"sha256": "0" * 63}])
async def test_a_bad_size_offset_or_sha256_is_refused(served, bad):
    query = {"folder": "checkpoints", "name": "q.safetensors", "size": 10, **bad}
    status, answer = await served.call("PUT", FILE, query, data=b"0123456789")
    assert status == 400 and answer["error"]
    assert os.listdir(served.ckpt) == []


async def break_off(served: Served, folder: str, name: str, data: bytes, cut: int = CUT, how: str = "ends") -> int:
    """Send data[:cut] of a `len(data)` file and stop: the body ends, or the connection
    breaks (once the agent wrote all of it); the agent's answer's `have`."""
    if how == "ends":
        status, answer = await served.put(folder, name, body(data[:cut // 2], data[cut // 2:cut]), len(data), sha(data))
    else:
        chunks = [data[i:i + CHUNK] for i in range(0, cut, CHUNK)]
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(served.put(folder, name, staged(served, chunks, give_up), len(data), sha(data)), WAIT)
        status, answer = await asyncio.wait_for(served.received.get(), WAIT)  # the agent's answer to nobody
    assert status == 400 and "ended at byte" in answer["error"]
    return answer["have"]


@pytest.mark.parametrize("how", ["ends", "breaks"])
@pytest.mark.parametrize("folder, name", [("checkpoints", "r.safetensors"), ("classifiers", "model")])
async def test_a_body_that_stops_early_stays_hidden_and_resumes(served, folder, name, how):
    data = model_bytes("r")
    where = served.ckpt if folder == "checkpoints" else served.cl
    exts = EXTS if folder == "checkpoints" else {""}
    cut = CUT
    assert await break_off(served, folder, name, data, cut, how) == cut

    # hidden from ComfyUI: a dot file whose extension the folder does not list
    [partial] = os.listdir(where)
    assert partial == f".{name}{PARTIAL}" and partial.startswith(".") and partial.endswith(PARTIAL)
    assert os.path.splitext(partial)[1].lower() not in exts
    assert (where / partial).read_bytes() == data[:cut]
    _, listing = await served.call("GET", "/lb/agent/models")
    assert listing["folders"][folder] == []
    q = {"folder": folder, "name": name}
    assert await served.call("GET", "/lb/agent/partial", q) == (200, {"have": cut, "exists": False})

    # an offset that is not where the partial file ends: told where to resume
    for offset in (0, cut - 1, cut + 1):
        status, answer = await served.put(folder, name, data[offset:], len(data), sha(data), offset=offset)
        assert status == 409 and answer["have"] == cut
    assert (where / partial).read_bytes() == data[:cut]

    status, answer = await served.put(folder, name, body(data[cut:]), len(data), sha(data), offset=cut)
    assert status == 201 and answer["sha256"] == sha(data)
    assert os.listdir(where) == [name] and (where / name).read_bytes() == data


async def test_asking_how_much_arrived_waits_for_the_copy_still_receiving(served):
    """The sender of a broken-off copy asks where to resume while the agent's handler may
    still hold bytes it read and did not write yet: the answer waits for that handler."""
    data, asking = model_bytes("h"), []
    q = {"folder": "checkpoints", "name": "h.safetensors"}

    async def rest() -> bytes:  # the agent wrote the first CHUNK: it is receiving
        asking.append(asyncio.ensure_future(served.call("GET", "/lb/agent/partial", q)))
        while await asyncio.wait_for(served.asked.get(), WAIT) != ("GET", "/lb/agent/partial"):
            pass
        return data[CHUNK:CHUNK + 1000]  # less than CHUNK: written when the body ends
    status, answer = await served.put("checkpoints", "h.safetensors", staged(served, [data[:CHUNK]], rest), len(data),
                                      sha(data))
    assert status == 400 and answer["have"] == CHUNK + 1000
    assert await asyncio.wait_for(asking[0], WAIT) == (200, {"have": CHUNK + 1000, "exists": False})


async def test_a_resumed_copy_that_does_not_match_its_sha256_is_dropped_whole(served):
    data = model_bytes("m")
    have = await break_off(served, "checkpoints", "m.safetensors", data, CUT)
    wrong = bytes(b ^ 1 for b in data[have:])
    status, _ = await served.put("checkpoints", "m.safetensors", wrong, len(data), sha(data), offset=have)
    assert status == 400 and os.listdir(served.ckpt) == []


async def test_more_bytes_than_declared_drop_the_partial(served):
    data = model_bytes("o")
    have = await break_off(served, "checkpoints", "o.safetensors", data, CUT)
    assert hidden(served.ckpt) == [f".o.safetensors{PARTIAL}"]
    status, answer = await served.put("checkpoints", "o.safetensors", data[have:] + b"extra", len(data), offset=have)
    assert status == 400 and "more than" in answer["error"]
    assert os.listdir(served.ckpt) == []


async def test_dropping_a_partial_removes_it(served):
    data = model_bytes("p")
    await break_off(served, "checkpoints", "p.safetensors", data, CUT)
    assert hidden(served.ckpt) == [f".p.safetensors{PARTIAL}"]
    q = {"folder": "checkpoints", "name": "p.safetensors"}
    assert await served.call("DELETE", "/lb/agent/partial", q) == (200, {"dropped": True})
    assert os.listdir(served.ckpt) == []
    assert await served.call("GET", "/lb/agent/partial", q) == (200, {"have": 0, "exists": False})


# -- untrusted names ------------------------------------------------------------------------

@pytest.mark.parametrize("folder, name", [
    ("checkpoints", "../x.safetensors"),
    ("checkpoints", "sd15/../../x.safetensors"),
    ("checkpoints", "{root}/abs.safetensors"),         # absolute
    ("checkpoints", "sd15\\..\\..\\x.safetensors"),    # backslashes
    ("checkpoints", ".x.safetensors"),                 # hidden
    ("checkpoints", "sd15/.x/y.safetensors"),
    ("checkpoints", "a\x01.safetensors"),              # control characters
    ("checkpoints", "a\nb.safetensors"),
    ("checkpoints", "C:x.safetensors"),
    ("checkpoints", "x.safetensors "),
    ("checkpoints", ""),
    ("checkpoints", "a/b/c/d/e/f/g/h/i.safetensors"),  # too many folders
    ("checkpoints", "x" * 240 + ".safetensors"),       # its partial file's name would pass 255 bytes
    ("checkpoints", "evil.py"),                         # an extension the folder does not hold
    ("checkpoints", f"x.safetensors{PARTIAL}"),
    ("classifiers", "model.safetensors"),               # extensionless only
    ("custom_nodes", "evil.py"),                        # code, never
    ("custom_nodes", "evil/__init__.py"),
    ("configs", "x.yaml"),                              # nor model configs
    ("nowhere", "x.safetensors"),
])
async def test_bad_names_are_refused_and_write_nothing(served, folder, name):
    name = name.format(root=served.root)
    data = model_bytes("bad", 1000)
    before = tree(served.root)
    status, answer = await served.put(folder, name, data, len(data), sha(data))
    assert status == 400 and answer["error"], answer
    for path in (FILE, FILE + "/data", "/lb/agent/partial"):
        assert (await served.call("GET", path, {"folder": folder, "name": name}))[0] == 400
    assert (await served.call("DELETE", "/lb/agent/partial", {"folder": folder, "name": name}))[0] == 400
    assert tree(served.root) == before


async def test_a_symlink_out_of_the_folder_is_refused(served):
    outside = served.root / "outside"
    outside.mkdir()
    os.symlink(outside, served.ckpt / "link")
    data = model_bytes("s", 1000)
    status, answer = await served.put("checkpoints", "link/x.safetensors", data, len(data), sha(data))
    assert status == 400 and "outside" in answer["error"]
    assert os.listdir(outside) == [] and os.listdir(served.ckpt) == ["link"]
    # a name inside the folder is still taken
    assert (await served.put("checkpoints", "x.safetensors", data, len(data), sha(data)))[0] == 201


async def test_names_the_file_system_refuses_are_a_clear_4xx(served):
    """A file where a folder is meant, a folder where the file would go: the file system
    says no, and the sender hears why — never a 500."""
    data = model_bytes("f", 1000)
    (served.ckpt / "x.safetensors").write_bytes(b"a file")
    (served.ckpt / "dir.safetensors").mkdir()
    for name in ("x.safetensors/y.safetensors", "dir.safetensors"):
        status, answer = await served.put("checkpoints", name, data, len(data), sha(data))
        assert 400 <= status < 500 and answer["error"], (name, status, answer)
    assert sorted(os.listdir(served.ckpt)) == ["dir.safetensors", "x.safetensors"]


async def test_a_symlink_to_nowhere_is_left_out_of_the_listing(served):
    os.symlink(served.root / "gone.safetensors", served.ckpt / "dangling.safetensors")
    (served.ckpt / "real.safetensors").write_bytes(b"model")
    status, listing = await served.call("GET", "/lb/agent/models")
    assert status == 200 and [f["name"] for f in listing["folders"]["checkpoints"]] == ["real.safetensors"]


# -- partial files nobody resumed -----------------------------------------------------------

async def test_sweep_removes_old_partials_and_keeps_fresh_ones(served):
    data = model_bytes("sw")
    for name in ("old.safetensors", "fresh.safetensors"):
        await break_off(served, "checkpoints", name, data, 1000)
    (served.ckpt / "kept.safetensors").write_bytes(b"model")  # not a partial: never swept
    old, fresh = served.ckpt / f".old.safetensors{PARTIAL}", served.ckpt / f".fresh.safetensors{PARTIAL}"
    now = fresh.stat().st_mtime + 60
    past = now - agent.PARTIAL_MAX_AGE - 60
    os.utime(old, (past, past))
    os.utime(served.ckpt / "kept.safetensors", (past, past))
    assert served.agent.sweep(now=now) == 1
    assert sorted(os.listdir(served.ckpt)) == sorted([fresh.name, "kept.safetensors"])
    assert served.agent.sweep(now=now + agent.PARTIAL_MAX_AGE + 120) == 1
    assert os.listdir(served.ckpt) == ["kept.safetensors"]
