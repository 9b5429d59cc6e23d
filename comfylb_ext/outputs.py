"""Output files: which peer holds each one, and the coordinator's copies of them.

A peer's outputs never change once written (ComfyUI numbers new files, and every peer
writes into its own subfolder), so a file is copied once — as soon as its peer announces
it — then served from here with sendfile, as fast as ComfyUI serving its own file, and
still after its peer is gone.  A file name produced again (a peer whose output folder was
emptied starts its numbering over) drops the old copy.  Bounded: the oldest copies go
first.  A `/view` that arrives while its file is being copied reads the copy's bytes as
they arrive instead of asking the peer a second time.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import urlencode

import aiohttp

from .access import relayed_file_headers
from .peer import Peer, PeerError
from .store import StateStore
from .uploads import TYPES, InputStore, split_annotation

log = logging.getLogger(__name__)


class ViewCache:
    def __init__(self, root: str | os.PathLike | None, limit_bytes: int) -> None:
        self.root = Path(root).resolve() if root and limit_bytes > 0 else None
        self.limit = limit_bytes
        self.sizes: dict[Path, int] = {}
        if self.root is not None and self.root.is_dir():
            files = sorted((p for p in self.root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
            self.sizes = {p: p.stat().st_size for p in files}  # insertion order = oldest first
        self.total = sum(self.sizes.values())
        self._lock = threading.Lock()  # put() runs in a worker thread

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _path(self, subfolder: str, filename: str) -> Path | None:
        if self.root is None:
            return None
        try:
            path = (self.root / os.path.normpath(subfolder or ".") / filename).resolve()
        except (OSError, ValueError):  # a NUL byte, a name too long, …
            return None
        return path if path.parent == self.root or self.root in path.parents else None

    def get(self, subfolder: str, filename: str) -> Path | None:
        path = self._path(subfolder, filename)
        return path if path is not None and path in self.sizes and path.is_file() else None

    def put(self, subfolder: str, filename: str, chunks: list[bytes]) -> None:
        path = self._path(subfolder, filename)
        size = sum(map(len, chunks))
        if path is None or size > self.limit:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part")
            with open(tmp, "wb") as f:
                f.writelines(chunks)
            os.replace(tmp, path)
        except OSError as e:
            log.debug("not cached %s: %s", path, e)
            return
        with self._lock:
            self.total += size - self.sizes.pop(path, 0)
            self.sizes[path] = size
            while self.total > self.limit and self.sizes:
                self.drop(next(iter(self.sizes)))

    def invalidate(self, subfolder: str, filename: str) -> None:
        path = self._path(subfolder, filename)
        if path is not None and path in self.sizes:
            with self._lock:
                self.drop(path)

    def drop(self, path: Path) -> None:
        """Forget and delete a copy (the caller holds the lock)."""
        self.total -= self.sizes.pop(path, 0)
        try:
            path.unlink()
        except OSError:
            pass


class Copy:
    """One output on its way from its peer: the bytes so far, readable by any number of
    `/view` requests while the rest arrives."""

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.headers: dict[str, str] | None = None  # once the peer has answered
        self.chunks: list[bytes] = []
        self.done = False
        self.ok = False
        self._more = asyncio.Event()

    def _wake(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    def answered(self, upstream: aiohttp.ClientResponse) -> None:
        self.headers = relay_headers(upstream)
        self._wake()

    async def opened(self) -> bool:
        """Wait for the peer's answer: False if this copy was given up before it."""
        while self.headers is None and not self.done:
            await self._more.wait()
        return self.headers is not None

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._wake()

    def finish(self, ok: bool) -> None:
        self.done, self.ok = True, ok
        self._wake()

    async def read(self) -> AsyncIterator[bytes]:
        """Every chunk, from the first; stops early if the peer broke off."""
        i = 0
        while True:
            while i < len(self.chunks):
                yield self.chunks[i]
                i += 1
            if self.done:
                return
            await self._more.wait()


Sink = Callable[[bytes], Awaitable[None]]


class Copies:
    """Copies in flight, one per file; each lands in the ViewCache when complete."""

    CHUNK = 1 << 20

    def __init__(self, cache: ViewCache, max_size: int, settled: Callable[[], None] = lambda: None) -> None:
        self.cache = cache
        self.settled = settled  # a copy left `inflight`: on disk, or given up
        self.max_size = min(max_size, cache.limit)
        self.inflight: dict[tuple[str, str], Copy] = {}

    def get(self, subfolder: str, filename: str) -> Copy | None:
        return self.inflight.get((subfolder, filename))

    def fits(self, upstream: aiohttp.ClientResponse) -> bool:
        return (self.cache.enabled and upstream.status == 200
                and upstream.content_length is not None and upstream.content_length <= self.max_size)

    def start(self, subfolder: str, filename: str) -> Copy:
        """A new copy, before the peer is even asked: a second reader follows this one
        instead of asking too.  Whoever starts it must fill() or drop() it."""
        copy = self.inflight[(subfolder, filename)] = Copy((subfolder, filename))
        return copy

    def drop(self, copy: Copy) -> None:
        """Give up a copy: its followers ask the peer themselves."""
        copy.finish(False)
        if self.inflight.get(copy.key) is copy:
            del self.inflight[copy.key]

    def forget(self, subfolder: str, filename: str) -> None:
        """The peer wrote a new file under this name: copies of the old one are stale."""
        self.inflight.pop((subfolder, filename), None)
        self.cache.invalidate(subfolder, filename)

    async def fill(self, copy: Copy, upstream: aiohttp.ClientResponse, sink: Sink | None = None) -> None:
        """Read the peer's answer into the copy, then onto disk; `sink` (the client whose
        request started the copy) gets each chunk as it arrives."""
        ok = False
        copy.answered(upstream)
        try:
            try:
                async for chunk in upstream.content.iter_chunked(self.CHUNK):
                    copy.add(chunk)
                    if sink is None:
                        await asyncio.sleep(0)  # let readers pass the chunk on before the next one
                        continue
                    try:
                        await sink(chunk)
                    except ConnectionError:
                        sink = None  # that client left; the copy goes on for the others
                ok = sum(map(len, copy.chunks)) == upstream.content_length
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("copy of %s/%s broke off: %s", *copy.key, e)
            finally:
                upstream.release()
                copy.finish(ok)
            if ok and self.inflight.get(copy.key) is copy:
                # on disk before it leaves `inflight`, so a reader always finds one or the other
                await asyncio.to_thread(self.cache.put, *copy.key, copy.chunks)
        finally:
            if self.inflight.get(copy.key) is copy:
                del self.inflight[copy.key]
                self.settled()


HOP_HEADERS = ("Content-Type", "Content-Disposition", "Content-Length", "Cache-Control", "Last-Modified", "ETag")


def relay_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    """The headers of a peer's answer worth passing on, with its type and disposition made
    safe here whatever the peer said: a file that could run script (SVG, HTML, …) is an
    attachment, never a page of this origin."""
    headers = {h: upstream.headers[h] for h in HOP_HEADERS if h in upstream.headers}
    name = upstream.url.query.get("filename") or upstream.url.path.rsplit("/", 1)[-1]
    return headers | relayed_file_headers(upstream.headers, name)


def _parts(path: str) -> list[str]:
    return path.replace("\\", "/").split("/")


def claimable(peer: str, key: tuple[str, str, str], holder: str | None = None) -> bool:
    """Whether a peer's report of a file (type, subfolder, filename) may say the file is
    there: an output only inside its own folder (routing.per_peer_outputs puts them there),
    so no prompt makes a peer answer for another peer's file; a temp file (previews) only
    if no other peer holds that name already (`holder`); an input never: the user's
    uploads are the coordinator's, whatever a peer says."""
    typ, subfolder, filename = key
    if not filename or filename in (".", "..") or any(c in filename for c in "/\\\x00"):
        return False
    if typ == "output":
        parts = _parts(subfolder)
        return parts[0] == peer and not any(p.strip(". ") == "" or "\x00" in p for p in parts[1:])
    if typ == "temp":
        return holder in (None, peer) and not any(p in (".", "..") or "\x00" in p for p in _parts(subfolder))
    return False


class Outputs:
    """Which peer holds each output file (kept in the state database), and the copies."""

    def __init__(self, db: StateStore, cache: ViewCache, max_size: int, prefetch: bool,
                 spawn: Callable, changed: Callable[[], None]) -> None:
        self.db = db
        self.cache = cache
        self.copies = Copies(cache, max_size, settled=changed)
        self.prefetch = prefetch and cache.enabled
        self.spawn = spawn
        self.holders: dict[tuple[str, str, str], str] = {}  # (type, subfolder, filename) → peer name
        self.own: str | None = None  # the peer that is this machine's ComfyUI: its files are here already
        self.holders.update((key, peer) for key, peer in db.load_files().items() if claimable(peer, key))

    def holder(self, typ: str, subfolder: str, filename: str) -> str | None:
        return self.holders.get((typ, subfolder, filename))

    def record(self, peer: Peer, outputs: dict, fresh: bool = False) -> None:
        """A node's outputs ({kind: [file, …]}) are on `peer`; fresh: just written (from
        `executed`), so a copy kept under the same name is stale; else the prompt is
        done, and outputs nobody viewed are copied now."""
        rows = []
        for items in outputs.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    key = (item.get("type") or "output", item.get("subfolder") or "", item["filename"])
                    if not (isinstance(key[0], str) and isinstance(key[1], str)
                            and claimable(peer.name, key, self.holders.get(key))):
                        log.warning("peer %s reported %r, which is not its to claim; ignored", peer.name, key)
                        continue
                    if fresh:
                        self.copies.forget(key[1], key[2])
                    elif key[0] == "output" and self.prefetch and peer.name != self.own:
                        # not at `executed`: the client's own /view, which comes at once,
                        # is then the one copy taken, streamed to it as it arrives
                        self.spawn(self._prefetch(peer, key[1], key[2]))
                    if self.holders.get(key) != peer.name:
                        self.holders[key] = peer.name
                        rows.append((*key, peer.name))
        if rows:
            self.db.set_files(rows)

    async def _prefetch(self, peer: Peer, subfolder: str, filename: str) -> None:
        """Copy a finished prompt's output that no client has asked for yet: later views
        are then served from here, and the image outlives its peer."""
        async with peer.prefetching:
            if self.cache.get(subfolder, filename) is not None:
                return
            try:
                taken, upstream = await self.open(peer, subfolder, filename)
            except PeerError:
                return
            if upstream is not None and taken is not None:
                await self.copies.fill(taken, upstream)
            elif upstream is not None:
                upstream.release()

    async def open(self, peer: Peer, subfolder: str, filename: str
                   ) -> tuple[Copy, None] | tuple[Copy, aiohttp.ClientResponse] | tuple[None, aiohttp.ClientResponse]:
        """An output file not on disk here: (copy, None), a copy on its way to follow
        (once it is opened()); (copy, answer), a new copy the caller fills from the
        peer's answer; (None, answer), a file not to be kept, to relay as it is."""
        taken = self.copies.get(subfolder, filename)
        if taken is not None:
            return taken, None
        taken = self.copies.start(subfolder, filename)
        try:
            upstream = await peer.open_stream("GET", "/view?" + urlencode(
                {"filename": filename, "subfolder": subfolder, "type": "output"}))
        except BaseException:
            self.copies.drop(taken)
            raise
        if not self.copies.fits(upstream):
            self.copies.drop(taken)
            return None, upstream
        return taken, upstream


# -- what a /view answers -----------------------------------------------------------------
# One case each; the HTTP handler only turns the case into its response.

@dataclass(frozen=True)
class Refused:
    """Not served: the status, with a text for people when there is more to say."""
    status: int
    text: str | None = None


@dataclass(frozen=True)
class HostsOwn:
    """A file the ComfyUI this runs in serves itself (the extension's host)."""


@dataclass(frozen=True)
class OnDisk:
    """A file on this machine: the copy of a peer's output, or an input stored here."""
    path: Path
    name: str


@dataclass(frozen=True)
class Following:
    """An output being copied from its peer: sent from its first byte as the rest arrives."""
    copy: Copy


@dataclass(frozen=True)
class Filling:
    """A new copy of an output: whoever receives this fills it from `upstream` (the peer's
    answer) while sending it on, or followers wait on it forever."""
    copy: Copy
    upstream: aiohttp.ClientResponse


@dataclass(frozen=True)
class Relayed:
    """The peer's answer passed through: `upstream` when the peer was asked already, None
    to ask it for the client's own query (it has the file, or can convert the input it
    was just given)."""
    peer: Peer
    upstream: aiohttp.ClientResponse | None = None


@dataclass(frozen=True)
class Unreachable:
    """The peer holding the file did not answer."""
    peer: Peer
    error: PeerError


View = Refused | HostsOwn | OnDisk | Following | Filling | Relayed | Unreachable


def view_target(query: Mapping[str, str]) -> tuple[str, str, str] | Refused:
    """The (type, subfolder, file name) a /view query names, or its refusal, as ComfyUI
    refuses it: nothing outside the type's folder is reachable by any spelling."""
    if "filename" not in query:
        return Refused(404)
    name, annotated = split_annotation(query["filename"])
    if not name or name[0] == "/" or ".." in name or "\x00" in name:
        return Refused(400)
    typ = annotated or query.get("type", "output")
    if typ not in TYPES:
        return Refused(400)
    sub = query.get("subfolder", "")
    if os.path.isabs(sub) or ".." in sub.replace("\\", "/").split("/") or "\x00" in sub:
        return Refused(403)
    return typ, sub, os.path.basename(name)


async def find_view(outputs: Outputs, inputs: InputStore, query: Mapping[str, str], *,
                    producer_of: Callable[[str, str, str], Peer | None], any_peer: Callable[[], Peer | None],
                    own_files: bool) -> View:
    """Where the file a /view query names comes from: a copy here, one on its way, a new
    copy, the peer that made it, an input stored here, or a peer converting that input.
    `own_files`: the host serves the files no peer produced (the extension)."""
    target = view_target(query)
    if isinstance(target, Refused):
        return target
    typ, sub, base = target
    peer = producer_of(typ, sub, base)
    if peer is not None and peer.name == outputs.own:
        return HostsOwn()  # written by the ComfyUI this runs in
    raw = "preview" not in query and query.get("channel", "rgba") == "rgba"
    if typ == "output" and raw:
        copied = await _copied_output(outputs, peer, sub, base)
        if copied is not None:
            return copied
    if peer is not None:
        return Relayed(peer)
    if own_files:
        return HostsOwn()
    stored = inputs.lookup(typ, sub, base)
    if stored is None:
        return Refused(404)
    if raw:
        return OnDisk(inputs.path_of(stored), base)
    # A converted view (preview/channel) needs an image library: let a peer do it.
    converter = any_peer()
    if converter is None:
        return Refused(503, "no peer available to convert the image")
    try:
        await converter.deliver(stored, inputs.path_of(stored))
    except PeerError as e:
        return Refused(502, str(e))
    return Relayed(converter)


async def _copied_output(outputs: Outputs, peer: Peer | None, sub: str, base: str) -> View | None:
    """An output as its copy here serves it (on disk, on its way, or started now), or
    None: no copy is to be had, and the peer is asked as for any file."""
    cached = outputs.cache.get(sub, base)
    if cached is not None:
        return OnDisk(cached, base)
    if peer is None or not outputs.cache.enabled:
        return None
    try:
        copy, upstream = await outputs.open(peer, sub, base)
    except PeerError as e:
        return Unreachable(peer, e)
    if copy is None:
        return Relayed(peer, upstream)  # not to be kept (too large, not a 200, …)
    if upstream is not None:
        return Filling(copy, upstream)
    if await copy.opened():
        return Following(copy)
    return None  # the copy it would have followed was not to be (too large, not there, …)
