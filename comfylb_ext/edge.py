"""A standing-by coordinator's share of the relaying: an edge (the leader's side is edges.py).

It links to every peer under an id of its own and keeps a socket to the leader.  For a
client whose socket it holds (passed on to the leader, proxy.py), the leader submits
prompts under the edge's id: the peer then sends their events here.  Progress and
previews — nearly all of a busy GPU's traffic — go from here straight to the client's
socket; everything else (start, nodes, results, the end) goes to the leader, which keeps
the ledger and sends those messages on through the same socket.  So that a client sees
what one ComfyUI would show, a prompt's progress reaches it only once the leader's own
messages of that prompt have (ordered delivery may hold them back); until then it is held
here, the newest HELD_MAX frames of it.

What it cannot place (a prompt it was not told of, a client not here) it passes to the
leader as is.  An edge without a leader for GRACE seconds lets its id go (closing its peer
links), as the leader adopts an id gone for longer.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from .config import ConfigError, parse_backend
from .delivery import Send
from .edges import CONNECT_WITHIN, GRACE, HEADER, HEARTBEAT, sign
from .peer import WS_MAX_MESSAGE, Peer
from .relay import PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA, frame_prompt, legacy_preview, parse_preview

log = logging.getLogger(__name__)

HEAVY = frozenset({"progress", "progress_state"})  # relayed here; everything else goes to the leader
ENDS = frozenset({"execution_success", "execution_error", "execution_interrupted"})
# the leader's messages that show a prompt's turn has come at a client (not, say, a
# queued prompt's comfylb.waiting)
STARTS = frozenset({"execution_start", "execution_cached", "executing", "executed"})
HELD_MAX = 64            # frames of one prompt held for one socket until its turn (the newest)
PROMPTS_MAX = 100_000    # prompts it was told of and has not seen end
OUTBOX_MAX = 10_000      # messages for the leader kept while there is none
PROGRESS_EVERY = 0.5     # seconds between the progress it tells the leader of, per prompt (for the panel)
# progress and progress_state as both hosts spell them (json.dumps of {"type", "data"})
_PROGRESS = '{"type": "progress'
ENDED_KEPT = 1000        # prompts remembered per socket as ended
RETRY = 0.5              # seconds between attempts to reach the leader
TELL_RELAYED = 100       # the leader hears how many messages it relayed, in steps of this many

Frame = tuple[str, Any]  # ("text", str) or ("bytes", bytes): as it goes to a client


def new_id() -> str:
    return "comfylb-edge-" + uuid.uuid4().hex


@dataclass(eq=False)
class Bridged:
    """One client socket this coordinator passes on to the leader."""
    ws: web.WebSocketResponse
    sid: str | None = None
    metadata: bool = False      # its previews with metadata (type 4), as it announced
    flags_seen: bool = False
    live: set[str] = field(default_factory=set)      # prompts whose messages it gets now
    held: dict[str, collections.deque] = field(default_factory=dict)
    ended: collections.OrderedDict = field(default_factory=collections.OrderedDict)


class Edge:
    def __init__(self, leader: Callable[[], Awaitable[str | None]],
                 secret: Callable[[], Awaitable[str | None]]) -> None:
        self.leader = leader        # the leading coordinator's URL, or None (a new one is told by NOTIFY)
        self.secret = secret        # the cluster's edge secret (from the database), or None
        self.id = new_id()
        self.peers: dict[str, Peer] = {}
        self.prompts: collections.OrderedDict[str, str] = collections.OrderedDict()  # prompt → client id
        self.running: dict[str, str] = {}     # peer → its running prompt (for binary frames without an id)
        self.clients: dict[str, set[Bridged]] = {}
        self.relayed = 0
        self._told_relayed = 0
        self._progress_told: dict[str, float] = {}
        self._outbox: collections.deque = collections.deque(maxlen=OUTBOX_MAX)
        self._ws: Any = None  # aiohttp.ClientWebSocketResponse while connected
        self._draining = False
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        # one websocket per peer, all open at once: no cap on connections
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        self._task = asyncio.ensure_future(self._control())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._let_go()
        if self._session is not None:
            await self._session.close()

    # -- the socket to the leader ------------------------------------------------------------
    async def _control(self) -> None:
        without_since: float | None = None
        while True:
            url, secret = await self.leader(), await self.secret()
            if url and secret and self._session is not None:
                try:
                    # a leader that hangs must not keep this edge's id past GRACE
                    connecting = self._session.ws_connect(url.rstrip("/") + "/lb/edge", heartbeat=HEARTBEAT,
                                                          max_msg_size=WS_MAX_MESSAGE,
                                                          headers={HEADER: sign(secret, self.id)})
                    async with await asyncio.wait_for(connecting, CONNECT_WITHIN) as ws:
                        without_since = None
                        self._draining = True  # what it says meanwhile joins the end of the outbox
                        log.info("edge %s: relaying for the leader at %s", self.id[-8:], url)
                        await ws.send_str(json.dumps({"linked": self._linked()}))
                        await ws.send_str(json.dumps({"holds": sorted(self.clients)}))
                        while self._outbox:
                            kind, body = self._outbox[0]
                            await (ws.send_str(body) if kind == "text" else ws.send_bytes(body))
                            self._outbox.popleft()  # sent: a failed send keeps it for the next leader
                        self._ws, self._draining = ws, False
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                await self._told(json.loads(msg.data))
                except aiohttp.WSServerHandshakeError as e:
                    if e.status == 409:  # its id was adopted (or is in use): a new one
                        await self._let_go()
                    else:
                        log.warning("edge: the leader refused it (HTTP %s)", e.status)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
                    log.info("edge: no socket to the leader (%s)", e)
                finally:
                    self._ws, self._draining = None, False
            now = time.monotonic()
            without_since = without_since or now
            if now - without_since > GRACE and self.peers:
                log.warning("edge %s: no leader for %.0f s; letting its id go", self.id[-8:], now - without_since)
                await self._let_go()
            await asyncio.sleep(RETRY)

    async def _let_go(self) -> None:
        """Its id and the links under it end (the leader adopts the id's prompts)."""
        await asyncio.gather(*(p.stop() for p in self.peers.values()), return_exceptions=True)
        self.peers.clear()
        self.prompts.clear()
        self.running.clear()
        self._outbox.clear()
        self.id = new_id()

    async def _told(self, said: Any) -> None:
        if not isinstance(said, dict):
            return
        if isinstance(said.get("task"), str) and isinstance(said.get("client"), str):
            self.prompts[said["task"]] = said["client"]
            while len(self.prompts) > PROMPTS_MAX:
                self.prompts.popitem(last=False)
        elif isinstance(said.get("peers"), list):
            await self._link(said["peers"])

    async def _link(self, peers: list) -> None:
        """Links to the leader's peers, under this edge's id."""
        wanted = {}
        for raw in peers:
            try:
                b = parse_backend(raw)
            except ConfigError as e:
                log.warning("edge: a peer the leader named is unusable: %s", e)
                continue
            wanted[b.name] = b
        for name in list(self.peers):
            if name not in wanted or self.peers[name].cfg != wanted[name]:
                await self.peers.pop(name).stop()
        assert self._session is not None
        for name, b in wanted.items():
            if name not in self.peers:
                self.peers[name] = peer = Peer(b, self._session, self.id, self)
                peer.start()

    def _linked(self) -> list[str]:
        return sorted(name for name, p in self.peers.items() if p.linked)

    async def _say(self, message: dict, keep: bool = True) -> None:
        """`keep`: False for what it says again anyway when it reaches a leader (its links,
        its clients): not kept while there is none, so never said out of date."""
        if keep or self._ws is not None or self._draining:
            await self._to_leader("text", json.dumps(message))

    async def _to_leader(self, kind: str, body: Any) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            if len(self._outbox) == self._outbox.maxlen:
                log.warning("edge: %d messages wait for a leader; the oldest are dropped", len(self._outbox))
            self._outbox.append((kind, body))
            return
        try:
            await (ws.send_str(body) if kind == "text" else ws.send_bytes(body))
        except (ConnectionError, RuntimeError):
            self._outbox.append((kind, body))

    # -- what its peers say (peer.PeerListener) ------------------------------------------------
    async def on_link_up(self, peer: Peer) -> None:
        await self._say({"linked": self._linked()}, keep=False)

    async def on_link_down(self, peer: Peer, reason: str) -> None:
        self.running.pop(peer.name, None)  # frames without a prompt id are not placed until it says again
        await self._say({"linked": self._linked()}, keep=False)

    async def on_message(self, peer: Peer, msg: dict) -> None:
        event, data = msg.get("type"), msg.get("data")
        if not isinstance(data, dict) or not isinstance(pid := data.get("prompt_id"), str):
            return  # its status broadcasts: the leader hears them on its own link
        sid = self.prompts.get(pid)
        if sid is not None and event in HEAVY and sid in self.clients:
            text = json.dumps(msg)  # once, whatever number of sockets the client has here
            await self._to_clients(sid, pid, lambda b: ("text", text))
            if event == "progress":
                await self._progress(peer, pid, data)
            return
        if event == "execution_start":
            self.running[peer.name] = pid
        elif event in ENDS and self.running.get(peer.name) == pid:
            del self.running[peer.name]
        elif event == "executing" and data.get("node") is None:
            self.prompts.pop(pid, None)
            self._progress_told.pop(pid, None)
        await self._say({"peer": peer.name, "event": msg})

    async def on_binary(self, peer: Peer, data: bytes) -> None:
        kind = int.from_bytes(data[:4], "big")
        pid = frame_prompt(kind, data[4:], self.running.get(peer.name))
        sid = self.prompts.get(pid) if pid else None
        if pid is None or sid is None or sid not in self.clients:
            name = peer.name.encode()
            await self._to_leader("bytes", len(name).to_bytes(2, "big") + name + data)
            return
        legacy: list[bytes] = []  # made once, for the first socket that wants a legacy preview

        def frame(b: Bridged) -> Frame:
            if kind != PREVIEW_IMAGE_WITH_METADATA or b.metadata:
                return "bytes", data
            if not legacy:
                parsed = parse_preview(data[4:])
                legacy.append(PREVIEW_IMAGE.to_bytes(4, "big") + legacy_preview(*parsed) if parsed else data)
            return "bytes", legacy[0]
        await self._to_clients(sid, pid, frame)

    async def _progress(self, peer: Peer, pid: str, data: dict) -> None:
        """The leader shows the running prompt's progress on the panel: told now and then."""
        now = time.monotonic()
        if now - self._progress_told.get(pid, 0.0) >= PROGRESS_EVERY or data.get("value") == data.get("max"):
            self._progress_told[pid] = now
            await self._say({"peer": peer.name, "progress": data})

    # -- its clients' sockets (proxy.py) ---------------------------------------------------------
    async def closed(self, b: Bridged) -> None:
        group = self.clients.get(b.sid or "")
        if group is not None:
            group.discard(b)
            if not group:
                del self.clients[str(b.sid)]
                await self._say({"holds": sorted(self.clients)}, keep=False)

    async def from_client(self, b: Bridged, text: str) -> Send | None:
        """A client's first message may announce what it reads (feature_flags)."""
        if b.flags_seen:
            return None
        b.flags_seen = True
        try:
            said = json.loads(text)
        except ValueError:
            return None
        flags = said.get("data") if isinstance(said, dict) and said.get("type") == "feature_flags" else None
        if isinstance(flags, dict):
            b.metadata = bool(flags.get("supports_preview_metadata"))
        return None

    async def from_leader(self, b: Bridged, text: str) -> Send | None:
        """A message the leader sends the client (before it is passed on): the first names
        the client's id (the leader hears it holds the client before the client can submit);
        one may start or end a prompt's turn.  Returns what to send after it: progress held
        for a prompt whose turn it starts."""
        if b.sid is not None and ('"prompt_id"' not in text or text.startswith(_PROGRESS)):
            return None  # most of what passes: nothing to parse (other spellings are parsed)
        try:
            said = json.loads(text)
        except ValueError:
            return None
        data = said.get("data") if isinstance(said, dict) else None
        if not isinstance(data, dict):
            return None
        if b.sid is None and said.get("type") == "status" and isinstance(data.get("sid"), str):
            b.sid = data["sid"]
            fresh = b.sid not in self.clients
            self.clients.setdefault(b.sid, set()).add(b)
            if fresh:
                await self._say({"holds": sorted(self.clients)}, keep=False)
            return None
        pid = data.get("prompt_id")
        if not isinstance(pid, str) or pid in b.ended:
            return None
        if said.get("type") in ENDS or (said.get("type") == "executing" and data.get("node") is None):
            b.live.discard(pid)
            b.held.pop(pid, None)
            b.ended[pid] = True
            if len(b.ended) > ENDED_KEPT:
                b.ended.popitem(last=False)
        elif pid not in b.live and said.get("type") in STARTS:
            b.live.add(pid)
            held = b.held.pop(pid, ())

            async def release() -> None:
                for frame in held:
                    await self._send(b, frame)
            return release if held else None
        return None

    async def _to_clients(self, sid: str, pid: str, frame: Callable[[Bridged], Frame]) -> None:
        for b in list(self.clients.get(sid, ())):
            if pid in b.live:
                await self._send(b, frame(b))
            elif pid not in b.ended:
                b.held.setdefault(pid, collections.deque(maxlen=HELD_MAX)).append(frame(b))
        if self.relayed - self._told_relayed >= TELL_RELAYED:
            self._told_relayed = self.relayed
            await self._say({"relayed": self.relayed}, keep=False)

    async def _send(self, b: Bridged, frame: Frame) -> None:
        kind, body = frame
        try:
            await (b.ws.send_str(body) if kind == "text" else b.ws.send_bytes(body))
            self.relayed += 1
        except (ConnectionError, RuntimeError):
            pass  # closing: the bridge cleans up
