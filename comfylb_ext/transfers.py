"""Model copies between peers: the coordinator streams a model file from a peer's agent
(or an http(s) URL) into another peer's agent (agent.py), a few at a time, resuming where
a broken copy stopped, and tells the panel how far each one is.

The coordinator finds which peers run an agent by asking each one (GET /lb/agent, signed
with auth.agent_secret) when its link comes up: no per-peer setting.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Coroutine
from urllib.parse import urlencode, urlsplit

import aiohttp

from . import agent
from .access import matches
from .peer import SMALL_BODY, Peer, PeerError

log = logging.getLogger(__name__)

AT_ONCE = 2            # copies running together (each one fills a disk and a link)
ATTEMPTS = 4           # tries of one copy, each resuming where the last stopped
KEPT = 50              # finished copies listed for the panel
TELL_EVERY = 0.5       # seconds between progress pushes of one copy
STREAM = 1 << 20       # bytes read from the source at once
SETUP_WITHIN = 15.0    # seconds for the small requests around a copy
HASH_WITHIN = 3600.0   # seconds a source may take to hash a file (a 20 GB one takes minutes)
ACTIVE = ("queued", "preparing", "copying")
# a body streamed for minutes: no limit on the whole, only on connecting and on silence
STREAMING = aiohttp.ClientTimeout(total=None, sock_connect=SETUP_WITHIN, sock_read=60)


class CopyRefused(ValueError):
    """A copy that cannot start; str() says why, for a 4xx."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Transfer:
    peer: str
    folder: str
    name: str
    source: str                      # a peer name or an http(s) URL
    sha256: str | None = None        # what the file must hash to (known from a peer source)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"            # queued, preparing, copying, done, failed
    done: int = 0
    total: int | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    reason: str = "asked"            # asked (POST …/models) or on_demand (a prompt needs it)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def from_url(self) -> bool:
        return is_url(self.source)

    def describe(self) -> dict:
        source = _shown(self.source) if self.from_url else self.source
        return {"id": self.id, "peer": self.peer, "folder": self.folder, "name": self.name, "source": source,
                "state": self.state, "done": self.done, "total": self.total, "sha256": self.sha256,
                "error": self.error, "started": self.started, "ended": self.ended, "reason": self.reason}


def _shown(url: str) -> str:
    """A URL without credentials or query (a signed download link is a secret)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port out of range, an unclosed [ …: nothing of it is shown
        return "(a URL that is not usable)"
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(port) if port else ''}{parts.path}"


def is_url(source: str) -> bool:
    """A copy's `from` names a URL, not a peer."""
    return source.startswith(("http://", "https://"))


def usable_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # raises for a port out of range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and len(url) <= 4096 \
        and not any(ord(c) < 0x21 or c == "\x7f" for c in url)


class Agents:
    """Signed calls to the agents on peers."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def headers(self, method: str, path: str, query: dict[str, str]) -> dict[str, str]:
        return {agent.HEADER: agent.sign(self.secret, method, path, query)}

    def target(self, path: str, query: dict[str, str]) -> str:
        return path + ("?" + urlencode(query) if query else "")

    async def call(self, peer: Peer, method: str, path: str, query: dict[str, str] | None = None,
                   timeout: float = SETUP_WITHIN) -> tuple[int, Any]:
        query = query or {}
        return await peer.request(method, self.target(path, query), timeout=timeout, max_size=SMALL_BODY,
                                  headers=self.headers(method, path, query))

    async def probe(self, peer: Peer) -> None:
        """Whether the peer runs an agent that takes our secret (peer.agent)."""
        if not self.secret:
            return
        nonce = secrets.token_hex(16)
        try:
            status, body = await self.call(peer, "GET", "/lb/agent", {"nonce": nonce})
        except PeerError as e:
            log.debug("peer %s: no answer about an agent: %s", peer.name, e)
            return
        proven = isinstance(body, dict) and isinstance(body.get("proof"), str) and matches(
            body["proof"], agent.proof(self.secret, nonce))
        was, peer.agent = peer.agent, status == 200 and proven and body.get("agent") == agent.VERSION
        if status == 200 and not proven:
            log.warning("peer %s answers as a ComfyLB agent but cannot prove it holds auth.agent_secret: models are "
                        "not copied to or from it", peer.name)
        if status == 401:
            log.warning("peer %s runs a ComfyLB agent with another auth.agent_secret: models are not copied to "
                        "or from it", peer.name)
        elif peer.agent and not was:
            log.info("peer %s: ComfyLB agent found: models can be copied to and from it", peer.name)


class Transfers:
    def __init__(self, agents: Agents, peers: Callable[[str], Peer | None],
                 session: Callable[[], aiohttp.ClientSession | None], spawn: Callable[[Coroutine[Any, Any, Any]], Any],
                 changed: Callable[[], None], copied: Callable[[Peer], Coroutine[Any, Any, Any]],
                 at_once: int = AT_ONCE) -> None:
        self.agents = agents
        self.peers = peers
        self.session = session
        self.spawn = spawn
        self.changed = changed
        self.copied = copied          # a copy landed on this peer: its catalog changed
        self.gate = asyncio.Semaphore(at_once)
        self.list: list[Transfer] = []

    def describe(self) -> list[dict]:
        return [t.describe() for t in self.list]

    def active_to(self, peer: str, folder: str, name: str) -> Transfer | None:
        return next((t for t in self.list if t.active and (t.peer, t.folder, t.name) == (peer, folder, name)), None)

    def copying(self, name: str) -> bool:
        """Whether a copy of a file of this name is under way anywhere (on_demand starts one)."""
        return any(t.active and t.name == name for t in self.list)

    async def start(self, dest: Peer, folder: Any, name: Any, source: Any, sha256: Any = None,
                    reason: str = "asked") -> tuple[Transfer, bool]:
        """(the copy, whether it is new); CopyRefused when it cannot start."""
        if not self.agents.secret:
            raise CopyRefused(409, "no auth.agent_secret in this coordinator's config: it cannot copy models")
        if not dest.agent:
            raise CopyRefused(409, f"peer {dest.name!r} runs no ComfyLB agent with this coordinator's "
                                   "auth.agent_secret (role: peer in its ComfyLB config)")
        if not isinstance(folder, str) or not folder or len(folder) > 128:
            raise CopyRefused(400, "folder must be a model folder name such as checkpoints")
        try:
            agent.check_name(name)
        except agent.BadName as e:
            raise CopyRefused(400, str(e)) from None
        if sha256 is not None and (not isinstance(sha256, str) or not agent._SHA256.fullmatch(sha256)):
            raise CopyRefused(400, "sha256 must be 64 lowercase hex digits")
        if not isinstance(source, str) or not source:
            raise CopyRefused(400, "from must be a peer name or an http(s) URL")
        if is_url(source) and not usable_url(source):
            raise CopyRefused(400, "from: not a usable http(s) URL")
        existing = self.active_to(dest.name, folder, name)
        if existing is not None:
            return existing, False
        # listed before the checks below wait on peers: a second request meanwhile gets this copy
        t = Transfer(dest.name, folder, name, source, sha256, reason=reason)
        self.list.append(t)
        try:
            await self._check_destination(dest, folder, name)
            if not is_url(source):
                await self._check_source(source, dest, folder, name)
        except BaseException:
            self.list.remove(t)
            raise
        self._trim()
        self.spawn(self._run(t))
        self.changed()
        return t, True

    async def _check_destination(self, dest: Peer, folder: str, name: str) -> None:
        try:
            status, body = await self.agents.call(dest, "GET", "/lb/agent/partial", {"folder": folder, "name": name})
        except PeerError as e:
            raise CopyRefused(502, f"peer {dest.name!r} did not answer: {e}") from None
        if status != 200:
            raise CopyRefused(400 if status in (400, 404) else 502, f"peer {dest.name!r}: {_said(body, status)}")

    async def _check_source(self, source: str, dest: Peer, folder: str, name: str) -> None:
        peer = self.peers(source)
        if peer is None:
            raise CopyRefused(400, f"from: no peer named {source[:64]!r} (nor an http(s) URL)")
        if peer is dest:
            raise CopyRefused(400, "from: the source is the destination")
        if not peer.agent:
            raise CopyRefused(409, f"from: peer {peer.name!r} runs no ComfyLB agent with this coordinator's secret")
        try:
            status, body = await self.agents.call(peer, "GET", "/lb/agent/file",
                                                  {"folder": folder, "name": name, "hash": "0"})
        except PeerError as e:
            raise CopyRefused(502, f"from: peer {peer.name!r} did not answer: {e}") from None
        if status != 200:
            raise CopyRefused(400 if status in (400, 404) else 502, f"from: peer {peer.name!r}: {_said(body, status)}")

    def _trim(self) -> None:
        done = [t for t in self.list if not t.active]
        for t in done[:max(0, len(done) - KEPT)]:
            self.list.remove(t)

    # -- running a copy ---------------------------------------------------------------
    async def _run(self, t: Transfer) -> None:
        async with self.gate:
            try:
                await self._copy(t)
                dest = self.peers(t.peer)
                if dest is not None:
                    await self.copied(dest)  # its catalog lists the file before the copy is said done
                t.state = "done"
                log.info("copied %s/%s to %s from %s (%d bytes)", t.folder, t.name, t.peer, t.describe()["source"],
                         t.done)
            except Exception as e:  # whatever went wrong, the copy ends failed, with nothing left behind
                said = str(e) or e.__class__.__name__
                if t.from_url:  # an error may spell the URL out, with its secrets
                    said = re.sub(r"https?://[^\s'\"]+", _shown(t.source), said)
                t.state, t.error = "failed", said
                log.warning("copy of %s/%s to %s failed: %s", t.folder, t.name, t.peer, t.error)
                await self._drop_partial(t)
            finally:
                t.ended = time.time()
                self.changed()

    async def _copy(self, t: Transfer) -> None:
        dest = self._peer(t.peer)
        t.state = "preparing"
        self.changed()
        if not t.from_url:
            status, info = await self.agents.call(self._peer(t.source), "GET", "/lb/agent/file",
                                                  {"folder": t.folder, "name": t.name}, timeout=HASH_WITHIN)
            if status != 200 or not isinstance(info, dict) or not isinstance(info.get("size"), int):
                raise CopyRefused(400, f"from: peer {t.source!r}: {_said(info, status)}")
            if t.sha256 is not None and info.get("sha256") != t.sha256:
                raise CopyRefused(400, f"from: peer {t.source!r} has another {t.name} (sha256 differs)")
            t.total, t.sha256 = info["size"], info.get("sha256")
        status, body = await self.agents.call(dest, "GET", "/lb/agent/partial", {"folder": t.folder, "name": t.name})
        have = body.get("have", 0) if status == 200 and isinstance(body, dict) else 0
        t.state = "copying"
        for attempt in range(1, ATTEMPTS + 1):
            try:
                status, body = await self._send(t, dest, have if isinstance(have, int) else 0)
            except (PeerError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if attempt == ATTEMPTS:
                    raise
                status, body = 0, {"error": str(e) or e.__class__.__name__, "have": have}
                try:  # where the receiver got to; if it cannot say, its 409 to the next try will
                    s, answer = await self.agents.call(dest, "GET", "/lb/agent/partial",
                                                       {"folder": t.folder, "name": t.name})
                    if s == 200 and isinstance(answer, dict):
                        body["have"] = answer.get("have")
                except PeerError:
                    pass
            if status in (200, 201):
                if isinstance(body, dict) and isinstance(body.get("sha256"), str):
                    t.sha256 = body["sha256"]
                t.done = t.total or t.done
                return
            have = body.get("have") if isinstance(body, dict) else None
            if status not in (0, 400, 409) or not isinstance(have, int) or attempt == ATTEMPTS:
                raise CopyRefused(502, f"peer {t.peer!r}: {_said(body, status)}")
            log.info("copy of %s/%s to %s broke off at byte %d (%s); resuming", t.folder, t.name, t.peer, have,
                     _said(body, status))

    async def _send(self, t: Transfer, dest: Peer, offset: int) -> tuple[int, Any]:
        """One attempt: the source from `offset` streamed into the destination's agent."""
        session = self.session()
        if session is None:
            raise CopyRefused(503, "the coordinator is stopping")
        source = await self._open_source(t, session, offset)
        try:
            if t.total is None:
                t.total = offset + source.content_length if source.content_length is not None else None
                if t.total is None:
                    raise CopyRefused(400, "from: the URL does not say how large the file is (no Content-Length)")
            query = {"folder": t.folder, "name": t.name, "size": str(t.total), "offset": str(offset)}
            if t.sha256:
                query["sha256"] = t.sha256
            t.done = offset
            return await dest.request("PUT", self.agents.target("/lb/agent/file", query), timeout=STREAMING,
                                      max_size=SMALL_BODY, data=self._counted(t, source),
                                      headers={**self.agents.headers("PUT", "/lb/agent/file", query),
                                               "Content-Type": "application/octet-stream"})
        finally:
            source.release()

    async def _open_source(self, t: Transfer, session: aiohttp.ClientSession, offset: int) -> aiohttp.ClientResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if t.from_url:
            r = await session.get(t.source, headers=headers, timeout=STREAMING)
        else:
            source, query = self._peer(t.source), {"folder": t.folder, "name": t.name}
            r = await source.open_stream("GET", self.agents.target("/lb/agent/file/data", query),
                                         headers={**headers, **self.agents.headers("GET", "/lb/agent/file/data", query)})
        if r.status != (206 if offset else 200):
            r.release()
            raise CopyRefused(400, f"from: {t.describe()['source']} answered HTTP {r.status} to "
                                   f"{'a resumed ' if offset else ''}download")
        return r

    async def _counted(self, t: Transfer, source: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        told = time.monotonic()
        async for chunk in source.content.iter_chunked(STREAM):
            t.done += len(chunk)
            yield chunk
            if time.monotonic() - told >= TELL_EVERY:
                told = time.monotonic()
                self.changed()

    async def _drop_partial(self, t: Transfer) -> None:
        """A copy given up leaves nothing behind on the destination."""
        dest = self.peers(t.peer)
        if dest is None:
            return
        try:
            await self.agents.call(dest, "DELETE", "/lb/agent/partial", {"folder": t.folder, "name": t.name})
        except PeerError as e:
            log.warning("peer %s: the partial copy of %s/%s was not removed: %s (the agent removes it within a day)",
                        t.peer, t.folder, t.name, e)

    def _peer(self, name: str) -> Peer:
        peer = self.peers(name)
        if peer is None or peer.removed:
            raise CopyRefused(409, f"peer {name!r} is gone")
        return peer


def _said(body: Any, status: int) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return f"HTTP {status}: {body['error'][:300]}"
    return f"HTTP {status}"
