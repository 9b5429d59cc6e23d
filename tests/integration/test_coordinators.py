"""Two standalone coordinators, one cluster: real ComfyUI peers, a real PostgreSQL, clients
on both.  One leads (dispatches); the other passes its clients on to it and takes over
when it dies."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections import Counter

import aiohttp
import pytest

from tests import procs
from tests.client import Client, sleep_prompt
from tests.conftest import peer_backend
from tests.unit.test_access import outward_address

pytestmark = pytest.mark.real

TERMINAL = ("execution_success", "execution_error", "execution_interrupted")
FAST = {"health_check": {"interval": 1.0, "timeout": 1.0, "unhealthy_threshold": 2, "healthy_threshold": 1},
        "queue": {"retry_interval": 1.0, "max_retries": 3, "max_size": 1000}}


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


@pytest.fixture
def pair(peers, workdir, postgres, request):
    """Coordinators a (leading) and b (standing by) on one database, over the real peers."""
    url = postgres.database(f"pair_{request.node.name[:20].lower()}")
    backends = [peer_backend(p, max_queue=1) for p in peers]
    names = {p.name for p in peers}
    made = []

    def start(name: str) -> procs.Proc:
        proc = procs.start_balancer(workdir, f"{request.node.name[:20]}-{name}", backends,
                                    storage={"dir": str(workdir / f"{request.node.name[:20]}-{name}-data"),
                                             "url": url}, **FAST)
        made.append(proc)
        return proc

    a = start("a")
    a.wait_ready("/system_stats", 60)
    procs.wait_backends(a, names)
    b = start("b")
    procs.wait_backends(b, names)  # answered by a, through b
    try:
        yield a, b, start
    finally:
        for proc in made:
            proc.stop()


class Sampler:
    """What each peer holds (running + pending in its own queue), read every 50 ms."""

    def __init__(self, peers) -> None:
        self.peers = peers
        self.most: Counter[str] = Counter()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            for p in self.peers:
                try:
                    q = await asyncio.to_thread(_get, p.url + "/queue")
                except OSError:
                    continue
                held = len(q["queue_running"]) + len(q["queue_pending"])
                self.most[p.name] = max(self.most[p.name], held)
            await asyncio.sleep(0.05)

    def stop(self) -> Counter[str]:
        self.task.cancel()
        return self.most


def edges_of(lb: procs.Proc, names: set[str], count: int = 1, timeout: float = 60) -> list[dict]:
    """The leader's edges once `count` of them link to every named peer (a stand-by starting up
    links to the peers itself before the leader sends prompts through it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        edges = _get(lb.url + "/lb/stats")["edges"]
        if sum(names <= set(e["linked"]) for e in edges) >= count:
            return edges
        time.sleep(0.2)  # another process: nothing to wait on but its answers
    raise AssertionError(f"no {count} edge(s) linked to {names} at {lb.url}: {edges}")


def ran_on(peers, ids: list[str]) -> Counter[str]:
    """How many peers' own histories hold each prompt: 1 means it ran exactly once."""
    seen: Counter[str] = Counter()
    for p in peers:
        history = _get(p.url + "/history?max_items=1000")
        seen.update(pid for pid in ids if pid in history)
    return seen


async def reconnect(url: str, client_id: str) -> Client:
    """As a client does when its socket drops: again, until the cluster answers (it has no
    leader for the moments a takeover lasts)."""
    for _ in range(120):
        c = Client(url, client_id=client_id)
        try:
            return await c.__aenter__()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            await c.session.close()
            await asyncio.sleep(0.5)  # a reconnect backoff, as the web UI's
    raise AssertionError(f"{url} never answered again")


def terminals(*clients: Client) -> Counter[str]:
    out: Counter[str] = Counter()
    for c in clients:
        for pid, run in c.runs.items():
            out[pid] += sum(1 for t, _ in run.messages if t in TERMINAL)
    return out


async def test_clients_on_both_coordinators_each_prompt_once_each_client_its_own(pair, peers):
    a, b, _ = pair
    edges_of(a, {p.name for p in peers})
    assert _get(a.url + "/lb/ready") == {"ready": True, "role": "leader"}
    assert _get(b.url + "/lb/ready") == {"ready": True, "role": "standby"}
    # a page on another site gets no further through a stand-by than through the leader
    for lb in (a, b):
        req = urllib.request.Request(lb.url + "/prompt", data=json.dumps({"prompt": sleep_prompt(0)}).encode(),
                                     headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 403
    assert _get(b.url + "/queue") == {"queue_running": [], "queue_pending": []}
    sampler = Sampler(peers)
    async with Client(a.url) as ca, Client(b.url) as cb:
        runs = {c: [(await c.queue(sleep_prompt(0.3, f"pair-{i}")))[2] for i in range(12)] for c in (ca, cb)}
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for rs in runs.values() for r in rs)), 240)
        for c, rs in runs.items():
            mine = {r.prompt_id for r in rs}
            assert all("execution_success" in r.types() for r in rs)
            assert set(c.runs) == mine and not set(c._early) - mine  # no other client's messages
        assert set(terminals(ca, cb).values()) == {1}
        ids = [r.prompt_id for rs in runs.values() for r in rs]
        assert set(ran_on(peers, ids).values()) == {1}  # each ran on one peer, once
        (_, ha), (_, hb) = await ca.get("/history"), await cb.get("/history")
        assert set(ids) <= set(ha) and ha == hb
        (_, pa), (_, pb) = await ca.get("/lb/backends"), await cb.get("/lb/backends")
        assert [p["name"] for p in pa["backends"]] == [p["name"] for p in pb["backends"]]
    most = sampler.stop()
    assert most and max(most.values()) <= 1, most  # max_queue 1 on every peer, whoever submitted


async def test_the_leader_killed_mid_run_the_other_takes_over_and_it_rejoins(pair, peers):
    a, b, start = pair
    edges_of(a, {p.name for p in peers})  # b's clients' prompts go through it: it takes over its own edge's
    picture = os.urandom(2048)
    async with Client(a.url) as ca, Client(b.url) as cb:
        form = aiohttp.FormData()
        form.add_field("image", picture, filename="before-takeover.png", content_type="image/png")
        async with cb.session.post(cb.base + "/upload/image", data=form) as r:  # through b, to the leader a
            assert r.status == 200, await r.text()
            uploaded = await r.json()
        ids = {c: [(await c.queue(sleep_prompt(1.0, "takeover")))[1]["prompt_id"] for _ in range(8)]
               for c in (ca, cb)}
        await ca.until(lambda: any("execution_start" in r.types() for r in ca.runs.values()), 60)
        a.signal(signal.SIGKILL)
        a.popen.wait(10)
        # both clients lose their sockets (b's was passed on to a) and come back to b
        before = terminals(ca, cb)
        client_ids = {c: c.client_id for c in (ca, cb)}
    again = {c: await reconnect(b.url, client_ids[c]) for c in (ca, cb)}
    try:
        for old, c in again.items():
            for pid in ids[old]:
                if before[pid] == 0:
                    c._track(pid)
        waiting = [r.done.wait() for c in again.values() for r in c.runs.values()]
        await asyncio.wait_for(asyncio.gather(*waiting), 240)
        after = terminals(*again.values())
        every = [pid for group in ids.values() for pid in group]
        assert sum(before[pid] == 0 for pid in every) >= 8  # killed mid-run: most had not finished
        assert all(before[pid] + after[pid] == 1 for pid in every), (before, after)
        assert set(ran_on(peers, every).values()) == {1}
        # what was uploaded to the old leader is served by the new one (the database kept it)
        status, got = await again[cb].get(f"/view?filename={uploaded['name']}&type=input")
        assert status == 200 and got == picture
        # the killed one comes back standing by, and answers as the leader does
        back = start("a2")
        procs.wait_backends(back, {p.name for p in peers})
        cb2 = again[cb]
        _, hist_b = await cb2.get("/history")
        async with Client(back.url) as cback:
            _, hist_back = await cback.get("/history")
        assert set(every) <= set(hist_b) and hist_back == hist_b
    finally:
        for c in again.values():
            await c.__aexit__(None, None, None)


async def test_a_stand_by_relays_its_clients_progress_and_its_death_loses_nothing(pair, peers):
    a, b, start = pair
    names = {p.name for p in peers}
    edges_of(a, names)
    async with Client(b.url) as cb:
        run = await cb.run(sleep_prompt(2.0, "edge"))
        progress = run.types().count("progress")
        assert run.types().count("execution_success") == 1 and progress >= 100
        assert run.types().index("execution_start") < run.types().index("progress")
        # the stand-by sent them, not the leader: it says how many it relayed itself
        (edge,) = _get(a.url + "/lb/stats")["edges"]
        assert 100 <= edge["relayed"] <= progress + run.types().count("progress_state") and edge["clients"] == 1
        ids = [(await cb.queue(sleep_prompt(3.0, "edge-dies")))[1]["prompt_id"] for _ in range(4)]
        await cb.until(lambda: sum("execution_start" in cb.runs[p].types() for p in ids) >= 2, 60)
        b.signal(signal.SIGKILL)  # mid-run: its prompts' peers were sending their events to it
        b.popen.wait(10)
        before = terminals(cb)
        at_kill = {p: (cb.runs[p].types(), _get(a.url + f"/lb/tasks/{p}")) for p in ids}
        client_id = cb.client_id
    again = await reconnect(a.url, client_id)
    try:
        for pid in ids:
            if before[pid] == 0:
                again._track(pid)
        try:
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in again.runs.values())), 120)
        except asyncio.TimeoutError:
            raise AssertionError(({p: r.types() for p, r in again.runs.items()}, at_kill, ran_on(peers, ids),
                                  {p: _get(a.url + f"/lb/tasks/{p}") for p in again.runs})) from None
        after = terminals(again)
        assert sum(before[pid] == 0 for pid in ids) >= 2
        assert all(before[pid] + after[pid] == 1 for pid in ids), (before, after)
        assert all("execution_success" in again.runs[p].types() for p in ids if before[p] == 0)
        assert set(ran_on(peers, ids).values()) == {1}
        back = start("b2")  # it comes back, standing by, and relays again
        procs.wait_backends(back, names)
        edges_of(a, names)
        async with Client(back.url) as cback:
            assert (await cback.run(sleep_prompt(0.5, "edge-back"))).types().count("progress") >= 10
    finally:
        await again.__aexit__(None, None, None)


async def test_inside_comfyui_a_second_coordinator_stands_by_and_takes_over(comfy_env, workdir, peers, postgres):
    """Two ComfyUIs with ComfyLB on one database: one leads, the other stands by — prompts and
    its web UI's API go through it to the leader — and after `kill -9` of the leader it leads
    and runs prompts itself, with the history the first one wrote."""
    from tests.conftest import coordinator

    url = postgres.database("inside")
    config = {"health_check": {"interval": 1.0, "timeout": 2.0}, "backends": [peer_backend(peers[0], max_queue=1)]}
    # beyond loopback without a token: /lb/* answers this machine only, through a stand-by too
    first = coordinator(comfy_env, workdir, "pg_first", {**config, "storage": {"dir": "pg_first-data", "url": url}},
                        extra_args=["--listen", "0.0.0.0"])
    second = coordinator(comfy_env, workdir, "pg_second", {**config, "storage": {"dir": "pg_second-data", "url": url}},
                         extra_args=["--listen", "0.0.0.0"])
    try:
        await asyncio.gather(asyncio.to_thread(first.wait_ready, "/system_stats", 180),
                             asyncio.to_thread(second.wait_ready, "/system_stats", 180))
        # Both start at once, so either may take the lead; exactly one does.
        led = {lb.name: _get(lb.url + "/lb/ready")["role"] for lb in (first, second)}
        assert sorted(led.values()) == ["leader", "standby"], led
        leader, other = (first, second) if led[first.name] == "leader" else (second, first)
        procs.wait_backends(other, {peers[0].name})  # answered by the leader, through the stand-by
        outward = outward_address()
        async with aiohttp.ClientSession() as s:
            if outward is not None:  # to the leader the stand-by is this machine: it judges for itself
                async with s.get(f"http://{outward}:{other.port}/lb/backends") as r:
                    assert r.status == 403 and "auth.token" in (await r.json())["error"]
            # the stand-by's answers are the leader's: listed as a peer, it is refused as the leader itself
            async with s.post(leader.url + "/lb/backends", json={"name": "standby", "host": "127.0.0.1",
                                                                 "port": other.port}) as r:
                assert r.status == 400 and "itself" in (await r.json())["error"]
        edges_of(leader, {peers[0].name})  # the stand-by links to the peer under its own id
        async with Client(other.url) as c:
            run = await c.run(sleep_prompt(0.5, "inside"))
            assert "execution_success" in run.types()
            assert run.types().count("progress") >= 10  # relayed by the stand-by itself (an edge)
        assert ran_on(peers[:1], [run.prompt_id])[run.prompt_id] == 1
        picture = os.urandom(4096)
        form = aiohttp.FormData()
        form.add_field("image", picture, filename="inside-before.png", content_type="image/png")
        async with aiohttp.ClientSession() as s, s.post(other.url + "/upload/image", data=form) as r:
            assert r.status == 200, await r.text()  # stored by the leader's ComfyUI, through the stand-by
            uploaded = await r.json()

        leader.signal(signal.SIGKILL)
        leader.popen.wait(10)
        procs.wait_backends(other, {peers[0].name})  # its own answer now: it leads
        assert _get(other.url + "/lb/ready")["role"] == "leader"
        async with Client(other.url) as c:
            again = await c.run(sleep_prompt(0.1, "inside-after"))
            assert "execution_success" in again.types()
            _, history = await c.get("/history")
        assert ran_on(peers[:1], [again.prompt_id])[again.prompt_id] == 1
        assert {run.prompt_id, again.prompt_id} <= set(history)
        async with aiohttp.ClientSession() as s, s.get(f"{other.url}/view?filename={uploaded['name']}&type=input") as r:
            assert r.status == 200 and await r.read() == picture  # the upload outlived its leader
    finally:
        first.stop()
        second.stop()
