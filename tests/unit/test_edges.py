"""Edges: a coordinator standing by relays its own clients' progress and previews, over
simulated peers (the real-peer tests are in tests/integration/test_coordinators.py)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import struct
import time

import aiohttp
import pytest
from aiohttp import web

from comfylb_ext import edges as edges_mod
from comfylb_ext.edge import Edge
from comfylb_ext.edges import HEADER, sign
from comfylb_ext.proxy import standby_app
from tests.client import Client, sleep_prompt
from tests.simcluster import lb_over_sims, wait_for


def ws_image_prompt(seconds: float = 0.2) -> dict:
    """Progress while it sleeps, then two progress messages and two previews."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                         "color": random.randrange(1 << 24)}},
            "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
            "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}}}


class Ordered(Client):
    """Also keeps every message's (type, prompt id) in the order it arrived."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen: list[tuple[str, str | None]] = []

    async def _handle(self, msg) -> None:
        if msg.type == aiohttp.WSMsgType.TEXT:
            m = json.loads(msg.data)
            d = m.get("data")
            self.seen.append((m["type"], d.get("prompt_id") if isinstance(d, dict) else None))
        elif msg.type == aiohttp.WSMsgType.BINARY:
            self.seen.append(("binary", None))
        await super()._handle(msg)


@contextlib.asynccontextmanager
async def edge_of(url: str, cluster):
    """A stand-by in front of the leader at `url`, relaying as an edge: (its url, the Edge)."""
    async def leader():
        return url

    async def secret():
        return cluster.edges.secret
    edge = Edge(leader, secret)
    runner = web.AppRunner(standby_app(leader, edge), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        await wait_for(lambda: edge.id in cluster.edges.edges
                       and cluster.edges.edges[edge.id].linked == set(cluster.peers), cluster)
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", edge
    finally:
        await runner.cleanup()


async def holds(cluster, client_id: str) -> None:
    await wait_for(lambda: any(client_id in e.holds for e in cluster.edges.edges.values()), cluster)


async def test_a_client_on_an_edge_gets_its_progress_and_previews_from_the_edge():
    async with lb_over_sims(2) as (url, sims, cluster), edge_of(url, cluster) as (edge_url, edge):
        async with Ordered(edge_url) as old, Ordered(edge_url, flags=True) as new:
            await holds(cluster, old.client_id)
            await holds(cluster, new.client_id)
            runs = await asyncio.gather(old.run(ws_image_prompt()), new.run(ws_image_prompt()))
        for run, kind in zip(runs, (1, 4)):
            types = run.types()
            assert types.count("execution_success") == 1 and types.count("progress") >= 3
            # progress only inside its prompt's turn: after its start, before its end
            assert types.index("execution_start") < types.index("progress")
            assert len(types) - 1 - types[::-1].index("progress") < types.index("execution_success")
            assert len(run.binary) == 2 and {struct.unpack(">I", b[:4])[0] for b in run.binary} == {kind}
            attempt = cluster.record[run.prompt_id].attempt_log[-1]
            assert attempt["via"] == edge.id  # its peer sent its events to the edge
        assert edge.relayed >= sum(r.types().count("progress") + len(r.binary) for r in runs)
        async with Client(url) as c:  # the edge's id is nobody's business
            _, hist = await c.get(f"/history/{runs[0].prompt_id}")
        assert all("via" not in a for a in hist[runs[0].prompt_id]["comfylb"]["attempts"])


async def test_a_later_prompts_progress_waits_for_the_earlier_ones_end():
    async with lb_over_sims(2) as (url, sims, cluster), edge_of(url, cluster) as (edge_url, edge):
        async with Ordered(edge_url) as c:
            await holds(cluster, c.client_id)
            _, _, first = await c.queue(sleep_prompt(0.6))
            _, _, second = await c.queue(ws_image_prompt(0.1))  # ends first, on the other peer
            await asyncio.wait_for(asyncio.gather(first.done.wait(), second.done.wait()), 20)
        last_of_first = max(i for i, (_, pid) in enumerate(c.seen) if pid == first.prompt_id)
        first_of_second = min(i for i, (t, pid) in enumerate(c.seen) if pid == second.prompt_id or t == "binary")
        assert last_of_first < first_of_second  # one prompt at a time, previews included
        assert second.types().count("progress") >= 1 and len(second.binary) == 2  # held, then given
        assert cluster.record[second.prompt_id].attempt_log[-1]["via"] == edge.id


async def test_an_edge_gone_mid_prompt_has_its_id_adopted_and_nothing_is_lost(monkeypatch):
    monkeypatch.setattr(edges_mod, "ADOPT_AFTER", 0.2)
    async with lb_over_sims(1) as (url, sims, cluster):
        client_id = "adopted-client"
        async with edge_of(url, cluster) as (edge_url, edge):
            c = Client(edge_url, client_id=client_id)
            await c.__aenter__()
            await holds(cluster, client_id)
            _, body, run = await c.queue(sleep_prompt(1.0))
            pid = body["prompt_id"]
            await c.until(lambda: "execution_start" in run.types())
            assert cluster.tasks[pid].via == edge.id
        await c.__aexit__(None, None, None)  # the edge went (closing its links); the prompt runs on
        async with Client(url, client_id=client_id) as back:
            run = back._track(pid)
            await asyncio.wait_for(run.done.wait(), 20)
            assert run.types().count("execution_success") == 1
        assert cluster.record[pid].state == "done" and cluster.counts["completed"] == 1
        assert len(sims[0].sim.history) == 1


async def test_a_peer_removed_while_it_runs_a_prompt_sent_through_an_edge_still_finishes_it():
    async with lb_over_sims(2) as (url, sims, cluster), edge_of(url, cluster) as (edge_url, edge):
        async with Client(edge_url) as c:
            await holds(cluster, c.client_id)
            _, body, run = await c.queue(sleep_prompt(0.5))
            pid = body["prompt_id"]
            await c.until(lambda: "execution_start" in run.types())
            assert cluster.tasks[pid].via == edge.id
            name = cluster.tasks[pid].peer
            await cluster.remove_peer(name)  # "prompts already there finish and are still relayed"
            await asyncio.wait_for(run.done.wait(), 20)
        assert run.types().count("execution_success") == 1 and cluster.record[pid].state == "done"
        await wait_for(lambda: name not in cluster.peers, cluster)  # then it goes


async def test_a_blip_on_an_edges_socket_sends_nothing_twice():
    async with lb_over_sims(1) as (url, sims, cluster), edge_of(url, cluster) as (edge_url, edge):
        async with Client(edge_url) as c:
            await holds(cluster, c.client_id)
            run = await c.run(sleep_prompt(0.1))
            told = run.types()
            await cluster.edges.edges[edge.id].ws.close()  # the edge and its clients' sockets stay
            await wait_for(lambda: edge.id not in cluster.edges.edges, cluster)
            assert edge.id in cluster.edges._resending  # were it gone, its clients would get their results again
            await wait_for(lambda: edge.id in cluster.edges.edges, cluster)  # back, with its id
            assert edge.id not in cluster.edges._resending
            again = await c.run(sleep_prompt(0.1))
        assert run.types() == told and again.types().count("execution_success") == 1


# -- hostile input ----------------------------------------------------------------------------
async def _connect(url: str, headers: dict) -> int:
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(url + "/lb/edge", headers=headers):
                return 101
        except aiohttp.WSServerHandshakeError as e:
            return e.status


async def test_only_a_signed_edge_is_let_in():
    async with lb_over_sims(1) as (url, sims, cluster):
        secret = cluster.edges.secret
        eid = "comfylb-edge-" + "a" * 32
        assert await _connect(url, {}) == 401
        assert await _connect(url, {HEADER: sign("another secret of 32 characters..", eid)}) == 401
        assert await _connect(url, {HEADER: sign(secret, eid, time.time() - 3600)}) == 401
        assert await _connect(url, {HEADER: sign(secret, eid, time.time() + 3600)}) == 401
        assert await _connect(url, {HEADER: sign(secret, "not-an-edge-id")}) == 401
        assert await _connect(url, {HEADER: "x ² y"}) == 401
        assert await _connect(url, {HEADER: sign(secret, eid), "Origin": "http://evil.example"}) == 403
        assert await _connect(url, {HEADER: sign(secret, eid)}) == 101


async def test_an_edge_cannot_speak_for_prompts_not_sent_through_it():
    async with lb_over_sims(1) as (url, sims, cluster):
        eid = "comfylb-edge-" + "b" * 32
        async with Client(url) as c, aiohttp.ClientSession() as s, \
                s.ws_connect(url + "/lb/edge", headers={HEADER: sign(cluster.edges.secret, eid)}) as rogue:
            peers = json.loads((await rogue.receive(timeout=5)).data)
            assert [p["name"] for p in peers["peers"]] == ["sim0"]
            _, body, run = await c.queue(sleep_prompt(0.5))
            pid = body["prompt_id"]
            await c.until(lambda: "execution_start" in run.types())
            for bad in ({"peer": "sim0", "event": {"type": "execution_success", "data": {"prompt_id": pid}}},
                        {"peer": "sim0", "event": {"type": "executing", "data": {"prompt_id": pid, "node": None}}},
                        {"peer": "sim0", "progress": {"prompt_id": pid, "value": 1, "max": 1}},
                        {"peer": "nobody", "event": {"type": "executing", "data": {"prompt_id": pid}}},
                        {"peer": ["sim0"], "event": "x"}, {"linked": "sim0"}, {"holds": [1, None, {}]},
                        {"relayed": "many"}, [], "text", {"linked": ["x"] * 20000}):
                await rogue.send_str(json.dumps(bad))
            await rogue.send_str("{" * 5000)
            await rogue.send_str("not json")
            await rogue.send_bytes(b"\x00\x04sim0" + struct.pack(">II", 4, 2) + b"{}")
            deep = b"[" * 200_000  # a preview's metadata nested past any parser's depth
            await rogue.send_bytes(b"\x00\x04sim0" + struct.pack(">II", 4, len(deep)) + deep)
            await rogue.send_bytes(b"\x00")
            await asyncio.wait_for(run.done.wait(), 20)
            assert not rogue.closed  # refused what it said, not the link
        assert run.types().count("execution_success") == 1 and run.types().count("executing") >= 2
        assert cluster.record[pid].state == "done" and len(sims[0].sim.history) == 1
        assert cluster.record[pid].attempt_log[-1].get("via") is None


@pytest.mark.parametrize("header", ["", "comfylb-edge-" + "c" * 32, "a b c d"])
async def test_garbage_signatures_are_401s_not_errors(header):
    async with lb_over_sims(1) as (url, sims, cluster):
        assert await _connect(url, {HEADER: header}) == 401


async def test_an_edge_links_to_more_peers_than_a_connection_pool_holds():
    """One websocket per peer, all open at once (aiohttp's default pool holds 100: the
    101st peer never linked, and a leader of a large fleet sent nothing through the edge)."""
    linked: asyncio.Queue = asyncio.Queue()

    async def peer_ws(request: web.Request) -> web.WebSocketResponse:  # a ComfyUI's /ws, enough to link
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    async def leader_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"peers": [{"name": f"p{i}", "host": "127.0.0.1", "port": port} for i in range(130)]})
        async for msg in ws:
            said = json.loads(msg.data)
            if "linked" in said:
                await linked.put(len(said["linked"]))
        return ws

    app = web.Application()
    app.router.add_get("/ws", peer_ws)
    app.router.add_get("/lb/edge", leader_ws)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]

    async def leader():
        return f"http://127.0.0.1:{port}"

    async def secret():
        return "s" * 64
    edge = Edge(leader, secret)
    await edge.start()
    try:
        async def all_linked() -> None:
            while await linked.get() < 130:
                pass
        await asyncio.wait_for(all_linked(), 30)
    finally:
        await edge.close()
        await runner.cleanup()
