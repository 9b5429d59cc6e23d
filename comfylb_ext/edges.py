"""The leader's side of relaying through edges (edge.py): the coordinators standing by
carry the event traffic of the clients whose sockets they hold.

A peer sends a prompt's events to the socket of the client id it was submitted under.
The leader submits a prompt under an edge's own id when that edge holds the socket of the
prompt's client and is linked to the chosen peer; the edge then gets every event of it,
relays progress and previews to its client itself, and passes the rest (start, nodes,
results, the end) here, where they change the ledger exactly as the leader's own link
would.  The leader stays the single writer; what grows with coordinators is the relaying.

An edge's word counts only for the prompts dispatched through it.  An edge that goes away
for good has its id adopted: after ADOPT_AFTER the leader links to each peer that still
runs prompts of its under that id (a peer keeps one socket per id, so never while the edge
could still hold it), and reconciles them with the peer's own history.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Coroutine, Mapping

import aiohttp
from aiohttp import web

from . import jsonsafe
from .access import matches
from .config import BackendConfig
from .peer import WS_MAX_MESSAGE, Peer, _well_formed, _well_formed_binary
from .relay import Relay, frame_prompt
from .tasks import Task

log = logging.getLogger(__name__)

HEADER = "X-ComfyLB-Edge"     # "<edge id> <unix time> <hex HMAC-SHA256 of 'edge <id> <time>'>"
SKEW = 300                    # seconds a signature stays good
ID = re.compile(r"comfylb-edge-[0-9a-f]{32}")
# An edge that lost the leader notices within 1.5 HEARTBEAT of the leader noticing, and lets
# its id go (closing its links under it) GRACE later, a connect attempt (CONNECT_WITHIN) at
# most after that: well before the leader adopts the id, which a peer must never see twice.
HEARTBEAT = 3.0               # seconds, on the edge's socket, both ways
GRACE = 3.0                   # seconds an edge without a leader keeps its id (edge.py)
CONNECT_WITHIN = 1.0          # seconds an edge's attempt to reach the leader may take
ADOPT_AFTER = 10.0            # seconds after an edge went before its id is adopted
MAX_HOLDS = 100_000           # client ids one edge may say it holds
MAX_NAMES = 10_000            # peer names one edge may say it links to
SWEEP_EVERY = 5.0             # seconds between looks for adopted links nothing runs under any more
RESEND_AFTER = 1.0            # seconds after an edge went that its clients' latest results go again …
RESENT = 2.0                  # … those sent to them up to this long before it went


def sign(secret: str, edge_id: str, at: float | None = None) -> str:
    t = str(int(time.time() if at is None else at))
    mac = hmac.new(secret.encode(), f"edge {edge_id} {t}".encode(), hashlib.sha256).hexdigest()
    return f"{edge_id} {t} {mac}"


def verified(secret: str, header: str | None) -> str | None:
    """The edge id a signed header names, or None (unsigned, wrong secret, stale, garbage)."""
    parts = (header or "").split(" ")
    if len(parts) != 3 or not ID.fullmatch(parts[0]) or not parts[1].isascii() or not parts[1].isdigit():
        return None
    if abs(time.time() - int(parts[1])) > SKEW:
        return None
    return parts[0] if matches(parts[2], sign(secret, parts[0], int(parts[1])).split(" ")[2]) else None


def shared_secret(db: Any) -> str:
    """The cluster's edge secret, made once and kept in its state database (store.StateStore)."""
    secret = db.get("edge_secret")
    if not isinstance(secret, str) or len(secret) < 32:
        secret = secrets.token_hex(32)
        db.put("edge_secret", secret)
    return str(secret)


def _loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class _Edge:
    id: str
    ws: web.WebSocketResponse
    local: bool                      # on the leader's machine: it may link to loopback peers
    linked: set[str] = field(default_factory=set)
    holds: set[str] = field(default_factory=set)
    relayed: int = 0                 # messages it sent to clients itself, as it last said


class Edges:
    def __init__(self, *, peers: Mapping[str, Peer], events: Any, recovery: Any, relay: Relay, secret: str,
                 session: Callable[[], aiohttp.ClientSession | None],
                 spawn: Callable[[Coroutine[Any, Any, Any]], Any], changed: Callable[[], None]) -> None:
        self.peers = peers
        self.events = events        # peerevents.PeerEvents
        self.recovery = recovery    # recovery.Recovery
        self.relay = relay
        self.secret = secret
        self.session = session
        self.spawn = spawn
        self.changed = changed      # what the panel shows of edges changed
        self.edges: dict[str, _Edge] = {}
        self._holders: dict[str, set[str]] = {}    # client id → edges holding a socket of it
        self._adopting: dict[str, asyncio.TimerHandle] = {}
        self._resending: dict[str, asyncio.TimerHandle] = {}
        self.adopted: dict[tuple[str, str], Peer] = {}  # (edge id, peer name) → our link under its id
        self.gone: set[str] = set()                 # ids adopted: never again an edge's
        self._sweeping: asyncio.Task | None = None

    # -- dispatch --------------------------------------------------------------------------
    def via(self, task: Task, peer: Peer) -> str | None:
        """The edge to dispatch `task` through, if one holds (all) its client's sockets and
        is linked to `peer`."""
        holders = self._holders.get(task.client_id or "")
        if not holders or len(holders) != 1:
            return None
        (edge_id,) = holders
        edge = self.edges.get(edge_id)
        return edge_id if edge is not None and peer.name in edge.linked else None

    async def tell(self, edge_id: str, task: Task, peer: Peer) -> None:
        """Before the peer has it: whose prompt it is (the edge routes its events by it)."""
        edge = self.edges.get(edge_id)
        if edge is not None:
            await _send(edge.ws, {"task": task.prompt_id, "client": task.client_id, "peer": peer.name})

    def restored(self) -> None:
        """After taking over: prompts dispatched through edges keep reporting to them; one
        that does not come back within ADOPT_AFTER is adopted."""
        for edge_id in {t.via for p in self.peers.values() for t in p.tasks.values() if t.via}:
            if edge_id not in self.edges:
                self._adopt_later(edge_id)

    async def peers_changed(self) -> None:
        for edge in list(self.edges.values()):
            await _send(edge.ws, {"peers": self._shared(edge)})

    def describe(self) -> list[dict]:
        return [{"linked": sorted(e.linked), "clients": len(e.holds), "relayed": e.relayed,
                 "prompts": sum(1 for p in self.peers.values() for t in p.tasks.values() if t.via == e.id)}
                for e in self.edges.values()]

    def _shared(self, edge: _Edge) -> list[dict]:
        """The peers an edge links to: a loopback address means the leader's machine, so
        those only to an edge on it."""
        return [asdict(p.cfg) for p in self.peers.values()
                if (not p.removed or any(t.via == edge.id for t in p.tasks.values()))  # those finish there
                and (edge.local or not _loopback(p.cfg.host))]

    # -- an edge's socket -----------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Origin"):
            return web.json_response({"error": "edges do not come from web pages"}, status=403)
        edge_id = verified(self.secret, request.headers.get(HEADER))
        if edge_id is None:
            return web.json_response({"error": f"{HEADER}: not signed with this cluster's secret"}, status=401)
        if edge_id in self.gone:
            return web.json_response({"error": "this edge id was adopted: take a new one", "adopted": True},
                                     status=409)
        if edge_id in self.edges:
            return web.json_response({"error": "an edge with this id is connected"}, status=409)
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=WS_MAX_MESSAGE)
        await ws.prepare(request)
        edge = self.edges[edge_id] = _Edge(edge_id, ws, _loopback(request.remote))
        for timers in (self._adopting, self._resending):
            timer = timers.pop(edge_id, None)
            if timer is not None:
                timer.cancel()  # it is back: what it passed on went out
        log.info("edge %s connected from %s", edge_id[-8:], request.remote)
        self.changed()
        try:
            await _send(ws, {"peers": self._shared(edge)})
            async for msg in ws:
                try:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        said = jsonsafe.peer_loads(msg.data)
                        if isinstance(said, dict):
                            await self._said(edge, said)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        await self._binary(edge, msg.data)
                except Exception as e:  # noqa: BLE001 - ValueError, RecursionError …: that message, not the link
                    log.warning("edge %s: message ignored: %s: %s", edge_id[-8:], e.__class__.__name__, e)
        finally:
            del self.edges[edge_id]
            for sid in edge.holds:
                self._unhold(edge_id, sid)
            # what it was passing on to its clients may have gone with it: theirs again, once
            # their sockets through it are gone here too
            sent = {sid: self.relay.sent.since(sid, RESENT) for sid in edge.holds}
            self._resending[edge_id] = asyncio.get_running_loop().call_later(
                RESEND_AFTER, lambda: self.spawn(self._resend(edge_id, sent)))
            log.info("edge %s went", edge_id[-8:])
            self.changed()
            if self._prompts_of(edge_id):
                self._adopt_later(edge_id)
        return ws

    async def _said(self, edge: _Edge, said: dict) -> None:
        if isinstance(said.get("event"), dict) and _well_formed(said["event"]):
            peer = self._peer_of(edge, said.get("peer"), said["event"].get("data"))
            if peer is not None:
                await self.events.on_message(peer, said["event"])
        elif isinstance(said.get("progress"), dict):
            peer = self._peer_of(edge, said.get("peer"), said["progress"])
            if peer is not None:
                await self.events.on_message(peer, {"type": "progress", "data": said["progress"]}, relay=False)
        elif isinstance(said.get("linked"), list):
            linked = {n for n in said["linked"][:MAX_NAMES] if isinstance(n, str)}
            back = linked - edge.linked
            edge.linked = linked
            self.changed()
            for name in back:  # its link was down: what ended meanwhile it never heard
                peer = self.peers.get(name)
                if peer is not None and any(t.via == edge.id for t in peer.tasks.values()):
                    self.spawn(self.recovery.reconcile(peer))
        elif isinstance(said.get("holds"), list):
            holds = {s for s in said["holds"][:MAX_HOLDS] if isinstance(s, str)}
            for sid in edge.holds - holds:
                self._unhold(edge.id, sid)
            for sid in holds - edge.holds:
                self._holders.setdefault(sid, set()).add(edge.id)
            edge.holds = holds
            self.changed()
        elif isinstance(said.get("relayed"), int):
            edge.relayed = said["relayed"]

    async def _binary(self, edge: _Edge, data: bytes) -> None:
        """A peer's binary frame the edge could not place: <u16 name length><name><frame>."""
        if len(data) < 6:
            return
        n = int.from_bytes(data[:2], "big")
        name, frame = data[2:2 + n].decode("utf-8", "replace"), data[2 + n:]
        peer = self.peers.get(name)
        if peer is None or not _well_formed_binary(frame):
            return
        pid = frame_prompt(int.from_bytes(frame[:4], "big"), frame[4:], peer.running)
        task = peer.tasks.get(pid) if pid else None
        if task is not None and task.via == edge.id:
            await self.events.on_binary(peer, frame)

    def _peer_of(self, edge: _Edge, name: Any, data: Any) -> Peer | None:
        """The peer an edge speaks of, if the prompt it speaks of went through that edge."""
        peer = self.peers.get(name) if isinstance(name, str) else None
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        task = peer.tasks.get(pid) if peer is not None and isinstance(pid, str) else None
        return peer if task is not None and task.via == edge.id else None

    async def _resend(self, edge_id: str, sent: dict[str, list[tuple[str, Any]]]) -> None:
        self._resending.pop(edge_id, None)
        for sid, results in sent.items():
            await self.relay.resend(sid, results)

    def _unhold(self, edge_id: str, sid: str) -> None:
        group = self._holders.get(sid)
        if group is not None:
            group.discard(edge_id)
            if not group:
                del self._holders[sid]

    # -- an edge gone: its id adopted ----------------------------------------------------------
    def _prompts_of(self, edge_id: str) -> dict[str, list[Task]]:
        return {p.name: found for p in self.peers.values()
                if (found := [t for t in p.tasks.values() if t.via == edge_id])}

    def _adopt_later(self, edge_id: str) -> None:
        if edge_id not in self._adopting:
            self._adopting[edge_id] = asyncio.get_running_loop().call_later(
                ADOPT_AFTER, lambda: self.spawn(self._adopt(edge_id)))

    async def _adopt(self, edge_id: str) -> None:
        self._adopting.pop(edge_id, None)
        if edge_id in self.edges:
            return  # it came back
        self.gone.add(edge_id)
        session = self.session()
        if session is None:
            return
        prompts = self._prompts_of(edge_id)
        for name in prompts:
            peer = self.peers[name]
            if (edge_id, name) in self.adopted:
                continue
            log.info("edge %s is gone: its %d prompt(s) on %s report to this coordinator now", edge_id[-8:],
                     len(prompts[name]), name)
            link = Peer(BackendConfig(**{**asdict(peer.cfg), "name": f"{name} (under edge {edge_id[-8:]}'s id)"}),
                        session, edge_id,
                        _Adoptee(self, peer, edge_id), peer.request_timeout)
            self.adopted[(edge_id, name)] = link
            link.start()
        if self.adopted and self._sweeping is None:
            self._sweeping = self.spawn(self._sweep())

    async def _sweep(self) -> None:
        """Adopted links whose prompts left by another way than their end (cancelled,
        taken back, requeued, their peer lost) close too."""
        try:
            while self.adopted:
                await asyncio.sleep(SWEEP_EVERY)
                for edge_id, name in list(self.adopted):
                    peer = self.peers.get(name)
                    if peer is None:
                        await self.adopted.pop((edge_id, name)).stop()
                    else:
                        await self._release(edge_id, peer)
        finally:
            self._sweeping = None

    async def _release(self, edge_id: str, peer: Peer) -> None:
        """Nothing of the gone edge's runs on `peer` any more: its id's link there closes."""
        if any(t.via == edge_id for t in peer.tasks.values()):
            return
        link = self.adopted.pop((edge_id, peer.name), None)
        if link is not None:
            await link.stop()

    async def close(self) -> None:
        for timer in [*self._adopting.values(), *self._resending.values()]:
            timer.cancel()
        await asyncio.gather(*(link.stop() for link in self.adopted.values()), return_exceptions=True)


class _Adoptee:
    """The leader's link under a gone edge's id: what arrives is the real peer's."""

    def __init__(self, edges: Edges, peer: Peer, edge_id: str) -> None:
        self.edges, self.peer, self.edge_id = edges, peer, edge_id

    async def on_link_up(self, link: Peer) -> None:
        await self.edges.recovery.reconcile(self.peer)  # what ended while nobody listened
        self.edges.spawn(self.edges._release(self.edge_id, self.peer))  # not from inside its own link

    async def on_link_down(self, link: Peer, reason: str) -> None:
        pass  # the peer's own link (the leader's) decides whether the peer is lost

    async def on_message(self, link: Peer, msg: dict) -> None:
        data = msg.get("data")
        if not isinstance(data, dict):
            return
        pid = data.get("prompt_id")
        task = self.peer.tasks.get(pid) if isinstance(pid, str) else None
        if task is not None and task.via == self.edge_id:
            await self.edges.events.on_message(self.peer, msg)
            if msg.get("type") == "executing" and data.get("node") is None:
                self.edges.spawn(self.edges._release(self.edge_id, self.peer))

    async def on_binary(self, link: Peer, data: bytes) -> None:
        await self.edges.events.on_binary(self.peer, data)


async def _send(ws: web.WebSocketResponse, message: dict) -> None:
    try:
        await ws.send_str(json.dumps(message))
    except (ConnectionError, RuntimeError):
        pass  # closing: its handler cleans up
