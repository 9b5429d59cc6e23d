"""Model copies (transfers.py) between two in-process agents, driven through real Peer
objects; what provisioning weighs (pure functions); the config of roles and provisioning."""
from __future__ import annotations

import asyncio
import hashlib
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from comfylb_ext import __main__ as cli
from comfylb_ext import agent
from comfylb_ext.agent import PARTIAL, Agent
from comfylb_ext.capability import Capabilities, requirements
from comfylb_ext.config import BackendConfig, ConfigError, Provision, parse
from comfylb_ext.peer import Peer
from comfylb_ext.provisioning import GUESS_RUN, lacks_only_models, time_until_free
from comfylb_ext.sim import catalog
from comfylb_ext import transfers as transfers_module
from comfylb_ext.transfers import ATTEMPTS, Agents, CopyRefused, Transfers

SECRET = "unit-agent-secret-0123456789"
CKPT = "checkpoints"
WAIT = 30  # seconds: a guard against hanging, never a synchronisation


def model_bytes(tag: str, size: int = (2 << 20) + 12345) -> bytes:
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Unlinked:
    """A PeerListener for peers whose websocket link is never started."""
    async def on_link_up(self, peer): ...
    async def on_link_down(self, peer, reason): ...
    async def on_message(self, peer, msg): ...
    async def on_binary(self, peer, data): ...


class Cluster:
    """Two peers, a and b, each an aiohttp app with an agent over its own checkpoints folder,
    and what a coordinator gives Transfers."""

    def __init__(self, root: Path, session: aiohttp.ClientSession) -> None:
        self.root, self.session = root, session
        self.runners: list[web.AppRunner] = []
        self.peers: dict[str, Peer] = {}
        self.dirs: dict[str, Path] = {}
        self.spawned: list[asyncio.Future] = []
        self.watchers: list = []     # called at each changed()
        self.copied: list[str] = []  # peers a copy landed on
        self.receiving = 0           # agent handlers under way (one ends after its sender gave up)
        self.idle = asyncio.Event()
        self.idle.set()

    async def serve(self, app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return runner.addresses[0][1]

    def peer(self, name: str, port: int) -> Peer:
        return Peer(BackendConfig(name=name, port=port), self.session, "unit-client", Unlinked(), 30.0)

    async def add_agent_peer(self, name: str) -> Peer:
        folder = self.root / name / CKPT
        folder.mkdir(parents=True)
        @web.middleware
        async def counted(request, handler):
            self.receiving += 1
            self.idle.clear()
            try:
                return await handler(request)
            finally:
                self.receiving -= 1
                if not self.receiving:
                    self.idle.set()

        app = web.Application(middlewares=[counted])
        Agent(SECRET, folders=lambda: {CKPT: ([str(folder)], {".safetensors"})}).add_to(app.router)
        self.peers[name], self.dirs[name] = self.peer(name, await self.serve(app)), folder
        return self.peers[name]

    def transfers(self, at_once: int = 2, secret: str = SECRET) -> Transfers:
        async def copied(peer: Peer) -> None:
            self.copied.append(peer.name)

        def changed() -> None:
            for w in self.watchers:
                w()
        return Transfers(Agents(secret), self.peers.get, lambda: self.session,
                         lambda coro: self.spawned.append(asyncio.ensure_future(coro)), changed, copied, at_once)

    async def settle(self) -> None:
        """Every copy started has ended, and every agent's handler."""
        await asyncio.wait_for(asyncio.gather(*self.spawned), WAIT)
        await asyncio.wait_for(self.idle.wait(), WAIT)

    def files(self, name: str) -> dict[str, bytes]:
        return {f: (self.dirs[name] / f).read_bytes() for f in os.listdir(self.dirs[name])}


@pytest.fixture
async def cluster(tmp_path):
    async with aiohttp.ClientSession() as session:
        c = Cluster(tmp_path, session)
        try:
            for name in ("a", "b"):
                (await c.add_agent_peer(name)).agent = True
            yield c
        finally:
            for task in c.spawned:
                task.cancel()
            for runner in c.runners:
                await runner.cleanup()


async def url_source(cluster: Cluster, files: dict[str, bytes], length: bool = True,
                     gates: dict[str, asyncio.Event] | None = None, arrived: asyncio.Queue | None = None,
                     breaks: dict[str, int] | None = None, ranges: list | None = None) -> str:
    """An http server of `files` (with Content-Length, or chunked without), from a Range's
    start on.  A file with a gate is sent once the gate opens, and its name goes to `arrived`
    when it is asked for; one with breaks left is sent half and the connection dropped."""
    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if arrived is not None:
            arrived.put_nowait(name)
        if ranges is not None:
            ranges.append(request.headers.get("Range"))
        if gates and name in gates:
            await gates[name].wait()
        start = int(request.headers.get("Range", "bytes=0-")[6:-1])
        rest = files[name][start:]
        response = web.StreamResponse(status=206 if start else 200)
        if length:
            response.content_length = len(rest)
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        if breaks and breaks.get(name):
            breaks[name] -= 1
            await response.write(rest[:len(rest) // 2])
            request.transport.close()  # the connection drops mid-file
            return response
        await response.write(rest)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/files/{name}", handler)
    return f"http://127.0.0.1:{await cluster.serve(app)}/files/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- finding agents -------------------------------------------------------------------------

async def test_probe_finds_an_agent_only_with_the_right_secret(cluster):
    port = cluster.peers["a"].cfg.port
    no_agent = await cluster.serve(web.Application())  # answers 404 to everything

    async def another_version(request: web.Request) -> web.Response:
        return web.json_response({"agent": 99, "proof": agent.proof(SECRET, request.query.get("nonce", ""))})

    def pretender(proof: str) -> web.Application:  # answers as an agent, without the secret
        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"agent": agent.VERSION, "folders": ["checkpoints"], "proof": proof})
        app = web.Application()
        app.router.add_get("/lb/agent", hello)
        return app
    other = web.Application()
    other.router.add_get("/lb/agent", another_version)
    other_agent = await cluster.serve(other)
    posing, posing_oddly = await cluster.serve(pretender("0" * 64)), await cluster.serve(pretender("é" * 64))
    for secret, at, found in ((SECRET, port, True), ("another-secret-0123456789", port, False),
                              (SECRET, no_agent, False), (SECRET, other_agent, False), (SECRET, posing, False),
                              (SECRET, posing_oddly, False), (SECRET, free_port(), None), ("", port, None)):
        peer = cluster.peer("x", at)
        assert peer.agent is None
        await Agents(secret).probe(peer)
        assert peer.agent is found, (secret, at)


# -- copies ---------------------------------------------------------------------------------

async def test_a_copy_between_peers_lands_with_the_same_sha256(cluster, monkeypatch):
    monkeypatch.setattr(transfers_module, "TELL_EVERY", 0.0)  # progress told at every chunk
    data = model_bytes("m")
    (cluster.dirs["a"] / "m.safetensors").write_bytes(data)
    transfers = cluster.transfers()
    seen: list[int] = []
    cluster.watchers.append(lambda: seen.extend(t.done for t in transfers.list if t.state == "copying"))
    t, new = await transfers.start(cluster.peers["b"], CKPT, "m.safetensors", "a")
    assert new and t.active and transfers.describe() == [t.describe()]
    await cluster.settle()
    assert (t.state, t.error, t.sha256) == ("done", None, sha(data))
    assert t.done == t.total == len(data) and t.ended is not None
    assert any(0 < done < len(data) for done in seen) and seen == sorted(seen)  # told along the way
    assert cluster.files("b") == {"m.safetensors": data} and cluster.copied == ["b"]

    # again: a new copy (the last one ended) that finds the same file there
    again, new = await transfers.start(cluster.peers["b"], CKPT, "m.safetensors", "a")
    assert new and again is not t
    await cluster.settle()
    assert (again.state, again.sha256) == ("done", sha(data)) and cluster.files("b") == {"m.safetensors": data}


async def test_a_copy_of_another_file_than_the_one_asked_for_fails_and_leaves_nothing(cluster):
    (cluster.dirs["a"] / "m.safetensors").write_bytes(model_bytes("m"))
    transfers = cluster.transfers()
    t, _ = await transfers.start(cluster.peers["b"], CKPT, "m.safetensors", "a", sha256=sha(b"another"))
    await cluster.settle()
    assert t.state == "failed" and "sha256 differs" in t.error
    assert cluster.files("b") == {} and cluster.copied == []


async def test_a_url_source_lands(cluster):
    data = model_bytes("u")
    url = await url_source(cluster, {"u.safetensors": data})
    transfers = cluster.transfers()
    t, _ = await transfers.start(cluster.peers["b"], CKPT, "u.safetensors", url + "u.safetensors?token=s3cret")
    assert "s3cret" not in str(t.describe())  # a signed download link is not shown
    await cluster.settle()
    assert (t.state, t.error, t.sha256, t.done, t.total) == ("done", None, sha(data), len(data), len(data))
    assert cluster.files("b") == {"u.safetensors": data} and cluster.copied == ["b"]


async def test_a_url_without_content_length_fails_clearly_and_leaves_nothing(cluster):
    url = await url_source(cluster, {"u.safetensors": model_bytes("u")}, length=False)
    transfers = cluster.transfers()
    t, _ = await transfers.start(cluster.peers["b"], CKPT, "u.safetensors", url + "u.safetensors")
    await cluster.settle()
    assert t.state == "failed" and "Content-Length" in t.error
    assert cluster.files("b") == {} and cluster.copied == []


async def test_a_copy_that_breaks_off_resumes_where_it_stopped(cluster):
    data, ranges = model_bytes("r"), []
    url = await url_source(cluster, {"r.safetensors": data}, breaks={"r.safetensors": 1}, ranges=ranges)
    transfers = cluster.transfers()
    t, _ = await transfers.start(cluster.peers["b"], CKPT, "r.safetensors", url + "r.safetensors", sha256=sha(data))
    await cluster.settle()
    assert (t.state, t.error, t.done, t.total) == ("done", None, len(data), len(data))
    assert cluster.files("b") == {"r.safetensors": data}
    # resumed from what the destination had (what it had read of the broken-off body)
    assert ranges[0] is None and len(ranges) == 2 and 0 < int(ranges[1][6:-1]) <= len(data) // 2, ranges


async def test_a_copy_that_keeps_breaking_off_fails_and_leaves_nothing(cluster):
    ranges: list = []
    url = await url_source(cluster, {"r.safetensors": model_bytes("r")}, breaks={"r.safetensors": 99}, ranges=ranges)
    transfers = cluster.transfers()
    t, _ = await transfers.start(cluster.peers["b"], CKPT, "r.safetensors", url + "r.safetensors")
    await cluster.settle()
    assert t.state == "failed" and t.error and len(ranges) == ATTEMPTS
    assert cluster.files("b") == {} and cluster.copied == []


@pytest.mark.parametrize("dest, folder, name, source, status, says", [
    ("b", CKPT, "absent.safetensors", "a", 400, "not on this peer"),   # the source lacks it
    ("b", CKPT, "m.safetensors", "nobody", 400, "no peer named"),
    ("b", CKPT, "m.safetensors", "b", 400, "destination"),
    ("b", CKPT, "m.safetensors", "ftp://example.org/m", 400, "no peer named"),
    ("b", CKPT, "../m.safetensors", "a", 400, ".."),
    ("b", "custom_nodes", "evil.py", "a", 400, "no model folder"),
    ("b", CKPT, "evil.py", "a", 400, ".py"),
    ("b", CKPT, "m.safetensors", "x", 409, "no ComfyLB agent"),        # a source without agent
    ("x", CKPT, "m.safetensors", "a", 409, "no ComfyLB agent"),        # a destination without agent
    ("b", CKPT, "m.safetensors", "http://h:99999/m", 400, "not a usable"),  # a port out of range
    ("b", CKPT, "m.safetensors", "http://[fe80::1/m", 400, "not a usable"),
    ("b", CKPT, "m.safetensors", "http://h/a b", 400, "not a usable"),
])
async def test_copies_that_cannot_be_made_are_refused_at_once(cluster, dest, folder, name, source, status, says):
    (cluster.dirs["a"] / "m.safetensors").write_bytes(b"model")
    cluster.peers["x"] = cluster.peer("x", cluster.peers["a"].cfg.port)  # reachable, not known to run an agent
    transfers = cluster.transfers()
    with pytest.raises(CopyRefused) as refused:
        await transfers.start(cluster.peers[dest], folder, name, source)
    assert refused.value.status == status and says in str(refused.value)
    assert transfers.list == [] and cluster.spawned == [] and cluster.files("b") == {}


async def test_a_failed_url_copy_does_not_spell_out_the_url(cluster):
    """A signed download link is a secret: neither the copy's error nor its source shows it."""
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(request.url))  # aiohttp's error for this names the whole URL
    app = web.Application()
    app.router.add_get("/{x}", loop)
    port = await cluster.serve(app)
    transfers = cluster.transfers()
    t, _ = await transfers.start(cluster.peers["b"], CKPT, "r.safetensors",
                                 f"http://127.0.0.1:{port}/r.safetensors?token=SECRET123")
    await cluster.settle()
    assert t.state == "failed" and t.error and "SECRET123" not in str(t.describe())


async def test_two_requests_for_one_copy_at_the_same_moment_make_one_copy(cluster):
    (cluster.dirs["a"] / "m.safetensors").write_bytes(model_bytes("m"))
    transfers = cluster.transfers()
    got = await asyncio.gather(*(transfers.start(cluster.peers["b"], CKPT, "m.safetensors", "a") for _ in range(3)))
    assert sorted(new for _, new in got) == [False, False, True] and len({t.id for t, _ in got}) == 1
    await cluster.settle()
    assert [t.state for t in transfers.list] == ["done"] and cluster.files("b") == {"m.safetensors": model_bytes("m")}


async def test_no_secret_no_copies(cluster):
    (cluster.dirs["a"] / "m.safetensors").write_bytes(b"model")
    with pytest.raises(CopyRefused) as refused:
        await cluster.transfers(secret="").start(cluster.peers["b"], CKPT, "m.safetensors", "a")
    assert refused.value.status == 409 and "agent_secret" in str(refused.value)


async def test_a_copy_asked_for_again_while_under_way_is_the_same_copy(cluster):
    data = model_bytes("g")
    gate, arrived = asyncio.Event(), asyncio.Queue()
    url = await url_source(cluster, {"g.safetensors": data}, gates={"g.safetensors": gate}, arrived=arrived)
    (cluster.dirs["a"] / "g.safetensors").write_bytes(data)
    transfers = cluster.transfers()
    t, new = await transfers.start(cluster.peers["b"], CKPT, "g.safetensors", url + "g.safetensors")
    assert new
    assert await asyncio.wait_for(arrived.get(), WAIT) == "g.safetensors"
    assert t.state == "copying"
    again, new = await transfers.start(cluster.peers["b"], CKPT, "g.safetensors", "a")  # from elsewhere, even
    assert again is t and not new and transfers.list == [t] and transfers.copying("g.safetensors")
    gate.set()
    await cluster.settle()
    assert t.state == "done" and cluster.files("b") == {"g.safetensors": data}
    assert not transfers.copying("g.safetensors")


async def test_copies_at_once_bounds_how_many_run_together(cluster):
    names = [f"m{i}.safetensors" for i in range(4)]
    files = {n: model_bytes(n, 100_000) for n in names}
    gates, arrived = {n: asyncio.Event() for n in names}, asyncio.Queue()
    url = await url_source(cluster, files, gates=gates, arrived=arrived)
    transfers = cluster.transfers(at_once=2)
    running: list[int] = []
    cluster.watchers.append(lambda: running.append(sum(t.state in ("preparing", "copying") for t in transfers.list)))
    copies = {n: (await transfers.start(cluster.peers["b"], CKPT, n, url + n))[0] for n in names}

    first = {await asyncio.wait_for(arrived.get(), WAIT) for _ in range(2)}
    assert len(first) == 2 and arrived.empty()
    assert sorted(t.state for t in copies.values()) == ["copying", "copying", "queued", "queued"]
    assert all(copies[n].state == "copying" for n in first)
    gates[sorted(first)[0]].set()
    third = await asyncio.wait_for(arrived.get(), WAIT)  # only once one of the first two ended
    assert third not in first and copies[third].state == "copying" and copies[sorted(first)[0]].state == "done"
    assert sorted(t.state for t in copies.values()) == ["copying", "copying", "done", "queued"]
    for gate in gates.values():
        gate.set()
    await cluster.settle()
    assert all(t.state == "done" for t in copies.values()) and cluster.files("b") == files
    assert max(running) == 2


# -- provisioning: what a copy would help and what waiting would cost -----------------------

def ckpt_prompt(name: str, extra: dict | None = None) -> SimpleNamespace:
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}, **(extra or {})}
    return SimpleNamespace(req=requirements(prompt))


def test_lacks_only_models():
    peer = SimpleNamespace(caps=Capabilities(catalog([], ["a.safetensors"])))
    assert lacks_only_models(peer, ckpt_prompt("a.safetensors")) == []
    assert lacks_only_models(peer, ckpt_prompt("b.safetensors")) == [("CheckpointLoaderSimple", "ckpt_name",
                                                                      "b.safetensors")]
    # an input named like a model that is no model picker there: not a file to copy
    free_text = {"3": {"class_type": "SaveImage", "inputs": {"file_name": "b.safetensors"}}}
    assert lacks_only_models(peer, ckpt_prompt("a.safetensors", free_text)) == []
    # a node type it lacks: copies cannot help
    exotic = {"3": {"class_type": "Exotic", "inputs": {}}}
    assert lacks_only_models(peer, ckpt_prompt("b.safetensors", exotic)) is None
    assert lacks_only_models(SimpleNamespace(caps=None), ckpt_prompt("b.safetensors")) is None
    assert lacks_only_models(peer, SimpleNamespace(req=None)) is None


def holder(*runs: SimpleNamespace, available: bool = False, slots: int = 1, mean: float | None = None):
    return SimpleNamespace(available=available, inflight={str(i): r for i, r in enumerate(runs)},
                           cfg=SimpleNamespace(max_queue=slots), tasks={str(i): r for i, r in enumerate(runs)},
                           mean_job_time=mean)


def run(predicted: float | None = None, started: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(predicted=predicted, started_at=started)


@pytest.mark.parametrize("holders, wait", [
    ([], math.inf),
    ([holder(available=True)], 0.0),                                  # a free slot now
    ([holder(run(100, 970), available=True, slots=2), holder(run(100, 970))], 0.0),
    ([holder(run(100, 970))], 70.0),                                  # predicted 100 s, 30 s in
    ([holder(run(100, 970), available=True)], 70.0),                  # available, but full
    ([holder(run(100, 870))], 0.0),                                   # overran its prediction
    ([holder(run(50))], 50.0),                                        # not started yet
    ([holder(run(100, 970), run(50), slots=2)], 120.0),               # one after the other
    ([holder(run(None, 995), mean=20)], 15.0),                        # its usual run time
    ([holder(run(None, 995))], GUESS_RUN - 5),
    ([holder(run(100, 970)), holder(run(20, 990))], 10.0),            # the least loaded
])
def test_time_until_free(holders, wait):
    assert time_until_free(holders, 1000.0) == wait


# -- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, field", [
    ({"role": "boss"}, "role"),
    ({"role": "peer"}, "auth.agent_secret"),
    ({"role": "peer", "auth": {"agent_secret": "short"}}, "auth.agent_secret"),
    ({"auth": {"agent_secret": "x" * 15}}, "auth.agent_secret"),
    ({"provisioning": {"models": "on_demand"}}, "provisioning.models"),
    ({"provisioning": {"models": "always"}, "auth": {"agent_secret": SECRET}}, "provisioning.models"),
    ({"provisioning": {"copies_at_once": 0}}, "provisioning"),
    ({"provisioning": {"expected_mb_per_s": 0}}, "provisioning"),
    ({"provisioning": {"eagerly": True}}, "provisioning.eagerly"),
])
def test_config_refuses(raw, field):
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert e.value.field == field


def test_config_takes_roles_and_provisioning():
    assert (parse({}).role, parse({}).provisioning.models, parse({}).auth.agent_secret) == ("coordinator", Provision.OFF, "")
    assert parse({"role": "peer", "auth": {"agent_secret": "x" * 16}}).role == "peer"
    cfg = parse({"auth": {"agent_secret": SECRET},
                 "provisioning": {"models": "on_demand", "copies_at_once": 3, "expected_mb_per_s": 50}})
    assert (cfg.provisioning.models, cfg.provisioning.copies_at_once, cfg.provisioning.expected_mb_per_s) == \
        (Provision.ON_DEMAND, 3, 50)


def test_the_standalone_balancer_refuses_role_peer_in_one_line(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(f"role: peer\nauth: {{agent_secret: {SECRET}}}\n")
    with pytest.raises(ConfigError) as e:
        cli.resolve_config(cli.parse_args(["-c", str(path)]))
    assert e.value.field == "role"
    assert cli.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert str(path) in err and "role" in err and "coordinator" in err
