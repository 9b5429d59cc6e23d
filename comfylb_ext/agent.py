"""The agent: ComfyLB installed on a peer with `role: peer` lists, serves and receives that
peer's model files, so the coordinator can copy a model to where a prompt needs it.

Every route needs a request signed with the shared `auth.agent_secret` (sign() below): the
agent writes into the peer's model folders, so nobody else may call it.  What it receives
goes to a hidden partial file beside its destination (same filesystem: the final rename
is atomic) whose extension no ComfyUI model folder lists; only a file whose size and
sha256 match what the sender declared is moved into place.  A partial file outlives a
broken connection so the sender can resume from where it stopped; it is removed when the
sender gives up (DELETE) or after PARTIAL_MAX_AGE.

Names are untrusted: a folder must be one of ComfyUI's model folders (never custom_nodes:
that would be installing code), a name a relative path inside it with a model extension.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from .access import matches

log = logging.getLogger(__name__)

HEADER = "X-ComfyLB-Agent"
VERSION = 1
SKEW = 300.0                   # seconds a signed request stays valid (clocks of peers differ)
MAX_MODEL = 1 << 40            # bytes: no model file is a terabyte
PARTIAL = ".comfylb-partial"   # no ComfyUI folder lists this extension
PARTIAL_MAX_AGE = 24 * 3600.0
CHUNK = 4 << 20                # bytes written to disk at once
HASH_BLOCK = 8 << 20
RECEIVE_WAIT = 30.0            # seconds a resumed copy waits for its broken-off predecessor to end
PARTIAL_WAIT = 5.0             # seconds a question about a partial file waits for such a one (the sender's
                               # own requests time out after transfers.SETUP_WITHIN)
FREE_MARGIN = 1 << 30          # bytes left free on the peer's disk after a copy
NOT_MODELS = frozenset({"custom_nodes", "configs"})
# a name part leaves room for the partial file's name (".<name>.comfylb-partial") within 255 bytes
_SEGMENT = re.compile(r"[^\x00-\x1f\x7f/\\:*?\"<>|]{1,200}")
_DIGITS = re.compile(r"[0-9]{1,15}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Folders(Protocol):
    """ComfyUI's model folders: {folder: ([paths], {extensions})}, as folder_paths has them."""
    def __call__(self) -> dict[str, tuple[list[str], set[str]]]: ...


def comfyui_folders() -> dict[str, tuple[list[str], set[str]]]:
    import folder_paths  # ComfyUI's own module: inside ComfyUI only
    return {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}


# -- signing ----------------------------------------------------------------------------
def _canonical(method: str, path: str, query: Mapping[str, str], ts: str) -> bytes:
    # decoded and sorted: the URL library of either side may encode the query differently
    return json.dumps([method.upper(), path, sorted(query.items()), ts], separators=(",", ":")).encode()


def sign(secret: str, method: str, path: str, query: Mapping[str, str], now: float | None = None) -> str:
    """The header value for one request: when, and an HMAC of the method, path, query and
    that time.  The body is not signed: what is written is checked by its sha256."""
    ts = str(int(now if now is not None else time.time()))
    return f"{ts}.{hmac.new(secret.encode(), _canonical(method, path, query, ts), hashlib.sha256).hexdigest()}"


def signed(secret: str, method: str, path: str, query: Mapping[str, str], value: str | None,
           now: float | None = None) -> bool:
    if not secret or not value or len(value) > 200:
        return False
    ts, _, mac = value.partition(".")
    if not _DIGITS.fullmatch(ts) or abs(int(ts) - (now if now is not None else time.time())) > SKEW:
        return False
    good = hmac.new(secret.encode(), _canonical(method, path, query, ts), hashlib.sha256).hexdigest()
    return matches(mac, good)  # never raises, whatever the header holds


def proof(secret: str, nonce: str) -> str:
    """An agent's answer to the coordinator's nonce: only one with the secret can give it."""
    return hmac.new(secret.encode(), f"agent-proof\n{nonce}".encode(), hashlib.sha256).hexdigest()


# -- names ------------------------------------------------------------------------------
class BadName(ValueError):
    """A folder or file name the agent will not touch; str() says why, for a 400."""


def check_name(name: Any) -> str:
    """A relative file name inside a model folder ("sd15/a.safetensors"), or BadName."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise BadName("name must be a file name of at most 1024 characters")
    parts = name.split("/")
    if len(parts) > 8:
        raise BadName("name has too many folders")
    for part in parts:
        if part in (".", "..") or not _SEGMENT.fullmatch(part) or part.startswith(".") or part != part.strip():
            raise BadName(f"name {name!r} is not a plain relative file name (no '..', hidden, absolute "
                          "or empty parts, no backslashes)")
    return name


@dataclass(frozen=True)
class Place:
    folder: str
    name: str
    base: str      # the folder's directory it is (or goes) in
    path: str      # the file

    @property
    def partial(self) -> str:
        head, tail = os.path.split(self.path)
        return os.path.join(head, f".{tail}{PARTIAL}")


def model_folders(folders: dict[str, tuple[list[str], set[str]]]) -> dict[str, tuple[list[str], set[str]]]:
    """The folders models may be copied into: ComfyUI's, minus code and configs, minus any
    that lists every file whatever its extension."""
    return {k: v for k, v in folders.items() if k not in NOT_MODELS and v[0] and v[1]}


def place(folders: dict[str, tuple[list[str], set[str]]], folder: Any, name: Any, existing: bool) -> Place:
    """Where a model file is (existing: in any of the folder's directories) or goes (the
    first directory).  BadName for an unknown folder, a name outside it, or an extension
    the folder does not hold."""
    usable = model_folders(folders)
    if not isinstance(folder, str) or folder not in usable:
        raise BadName(f"no model folder {str(folder)[:64]!r} on this peer (one of: {', '.join(sorted(usable))})")
    name = check_name(name)
    bases, extensions = usable[folder]
    ext = os.path.splitext(name)[1].lower()
    if ext not in extensions:
        raise BadName(f"{folder} holds {', '.join(sorted(e for e in extensions if e)) or 'no'} files, not {ext or 'extensionless'} ones")
    if existing:  # read as ComfyUI reads it: a model symlinked in from shared storage is one of its models
        for base in bases:
            path = os.path.join(os.path.abspath(base), *name.split("/"))  # check_name: no way up
            if os.path.isfile(path):
                return Place(folder, name, os.path.abspath(base), path)
        raise FileNotFoundError(f"{folder}/{name} is not on this peer")
    root = os.path.realpath(bases[0])
    path = os.path.realpath(os.path.join(root, *name.split("/")))
    if not path.startswith(root + os.sep):  # written only inside: a symlinked folder inside leads elsewhere
        raise BadName(f"name {name!r} leads outside the {folder} folder")
    return Place(folder, name, root, path)


# -- hashing ----------------------------------------------------------------------------
class Hashes:
    """sha256 of files by (path, size, mtime): a model file is hashed once, not per listing."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, int, str]] = {}
        self._lock = asyncio.Lock()  # one file hashed at a time: the disk is the bottleneck

    def known(self, path: str) -> str | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        got = self._known.get(path)
        return got[2] if got is not None and got[:2] == (st.st_size, st.st_mtime_ns) else None

    async def of(self, path: str) -> str:
        async with self._lock:
            st = os.stat(path)
            digest = self.known(path)
            if digest is None:
                digest = await asyncio.to_thread(file_sha256, path)
            self._known[path] = (st.st_size, st.st_mtime_ns, digest)
            return digest

    def remember(self, path: str, digest: str) -> None:
        st = os.stat(path)
        self._known[path] = (st.st_size, st.st_mtime_ns, digest)


def file_sha256(path: str, limit: int | None = None) -> str:
    return _hash_prefix(path, limit).hexdigest()


def _hash_prefix(path: str, limit: int | None = None) -> Any:
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(HASH_BLOCK if left is None else min(HASH_BLOCK, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h


# -- the routes -------------------------------------------------------------------------
def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Agent:
    def __init__(self, secret: str, folders: Callable[[], dict[str, tuple[list[str], set[str]]]] = comfyui_folders) -> None:
        if not secret:
            raise ValueError("the agent needs auth.agent_secret")
        self.secret = secret
        self.folders = folders
        self.hashes = Hashes()
        self._receiving: dict[str, asyncio.Lock] = {}  # one writer per destination; the next waits
        self._drop_after: set[str] = set()  # dropped while being received: removed when that ends

    def routes(self) -> list[tuple[str, str, Callable[[web.Request], Any]]]:
        return [("GET", "/lb/agent", self.hello),
                ("GET", "/lb/agent/models", self.models),
                ("GET", "/lb/agent/file", self.file_info),
                ("GET", "/lb/agent/file/data", self.file_data),
                ("GET", "/lb/agent/partial", self.partial_info),
                ("DELETE", "/lb/agent/partial", self.partial_drop),
                ("PUT", "/lb/agent/file", self.receive)]

    def add_to(self, router: Any) -> None:
        for method, path, handler in self.routes():
            router.add_route(method, path, self.guarded(handler))

    def guarded(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not signed(self.secret, request.method, request.path, request.query, request.headers.get(HEADER)):
                return _error(401, "not signed with this peer's auth.agent_secret")
            try:
                response: web.StreamResponse = await handler(request)
                return response
            except BadName as e:
                return _error(400, str(e))
            except FileNotFoundError as e:
                return _error(404, str(e))
            except OSError as e:  # a name the file system refuses, a file where a folder is meant, …
                return _error(409, f"this peer's file system refused it: {e.strerror or e.__class__.__name__}")
        return guarded

    def _place(self, request: web.Request, existing: bool) -> Place:
        return place(self.folders(), request.query.get("folder"), request.query.get("name"), existing)

    async def hello(self, request: web.Request) -> web.Response:
        """?nonce=N: the agent proves it holds the secret too, so a peer cannot pose as an
        agent to be sent copies of models."""
        nonce = request.query.get("nonce", "")[:128]
        return web.json_response({"agent": VERSION, "folders": sorted(model_folders(self.folders())),
                                  "proof": proof(self.secret, nonce)})

    async def models(self, request: web.Request) -> web.Response:
        """Every model file with its size, and its sha256 where already known (the file
        route computes it)."""
        def scan() -> dict[str, list[dict]]:
            out: dict[str, list[dict]] = {}
            for folder, (bases, exts) in sorted(model_folders(self.folders()).items()):
                files: dict[str, dict] = {}
                for base in bases:
                    for name, path in _walk(base, exts):
                        try:
                            size = os.path.getsize(path)
                        except OSError:  # a symlink to nowhere: ComfyUI could not load it either
                            continue
                        if name not in files:
                            files[name] = {"name": name, "size": size, "sha256": self.hashes.known(path)}
                out[folder] = [files[k] for k in sorted(files)]
            return out
        return web.json_response({"folders": await asyncio.to_thread(scan)})

    async def file_info(self, request: web.Request) -> web.Response:
        at = self._place(request, existing=True)
        digest = await self.hashes.of(at.path) if request.query.get("hash", "1") != "0" else self.hashes.known(at.path)
        return web.json_response({"folder": at.folder, "name": at.name, "size": os.path.getsize(at.path),
                                  "sha256": digest})

    async def file_data(self, request: web.Request) -> web.StreamResponse:
        at = self._place(request, existing=True)
        return web.FileResponse(at.path, headers={"Content-Type": "application/octet-stream"})  # Range: resumable

    async def partial_info(self, request: web.Request) -> web.Response:
        at = self._place(request, existing=False)
        lock = self._receiving.get(at.path)
        if lock is not None and lock.locked():  # a broken-off copy's handler may not have written all it
            # read yet: its sender, asking where to resume, would hear too little and lose an attempt (409)
            try:
                await asyncio.wait_for(lock.acquire(), PARTIAL_WAIT)
                lock.release()
            except asyncio.TimeoutError:
                pass
        have = os.path.getsize(at.partial) if os.path.isfile(at.partial) else 0
        return web.json_response({"have": have, "exists": os.path.isfile(at.path)})

    async def partial_drop(self, request: web.Request) -> web.Response:
        at = self._place(request, existing=False)
        lock = self._receiving.get(at.path)
        if lock is not None and lock.locked():
            self._drop_after.add(at.path)
        else:
            _drop(at)
        return web.json_response({"dropped": True})

    async def receive(self, request: web.Request) -> web.Response:
        """PUT ?folder&name&size&sha256[&offset]: the body is the file from `offset` on
        (the partial file holds the bytes before it).  201 once the whole file matched its
        sha256 and is in place; 409 with `have` when the offset is not where the partial
        file ends; 400 when the body ended early (the partial file stays, to resume)."""
        q = request.query
        at = self._place(request, existing=False)
        size, offset, digest = _int(q.get("size")), _int(q.get("offset", "0")), q.get("sha256", "")
        if size is None or not 0 < size <= MAX_MODEL or offset is None or not 0 <= offset <= size:
            return _error(400, f"size must be 1..{MAX_MODEL} bytes and offset 0..size")
        if digest and not _SHA256.fullmatch(digest):
            return _error(400, "sha256 must be 64 lowercase hex digits (or left out: then it is not checked)")
        lock = self._receiving.setdefault(at.path, asyncio.Lock())
        try:  # a broken-off copy's handler may still be finishing when its sender resumes
            await asyncio.wait_for(lock.acquire(), RECEIVE_WAIT)
        except asyncio.TimeoutError:
            return _error(409, f"{at.folder}/{at.name} is already being received")
        try:
            return await self._receive_locked(request, at, size, offset, digest)
        finally:
            lock.release()  # kept: one lock per file ever copied here, a handful
            if at.path in self._drop_after:
                self._drop_after.discard(at.path)
                _drop(at)

    async def _receive_locked(self, request: web.Request, at: Place, size: int, offset: int,
                              digest: str) -> web.Response:
        if os.path.lexists(at.path) and not os.path.isfile(at.path):
            return _error(409, f"{at.folder}/{at.name} is taken on this peer by something that is not a file")
        if os.path.isfile(at.path):
            have_digest = await self.hashes.of(at.path)
            if os.path.getsize(at.path) == size and digest in ("", have_digest):
                return web.json_response({"folder": at.folder, "name": at.name, "size": size, "sha256": have_digest,
                                          "exists": True}, status=200)
            return _error(409, f"a different file named {at.folder}/{at.name} is already on this peer")
        return await self._receive(request, at, size, offset, digest)

    async def _receive(self, request: web.Request, at: Place, size: int, offset: int, digest: str) -> web.Response:
        have = os.path.getsize(at.partial) if os.path.isfile(at.partial) else 0
        if have != offset:
            return web.json_response({"error": f"resume from byte {have}", "have": have}, status=409)
        os.makedirs(os.path.dirname(at.path), exist_ok=True)
        free = shutil.disk_usage(os.path.dirname(at.path)).free
        if free < size - have + FREE_MARGIN:
            return _error(413, f"not enough free space on this peer for {at.name}: {size - have} bytes "
                               f"needed, {free} free")
        hasher = await asyncio.to_thread(_hash_prefix, at.partial) if have else hashlib.sha256()
        got, over = have, False
        with open(at.partial, "ab") as out:
            buffer = bytearray()
            try:
                async for chunk in request.content.iter_chunked(1 << 16):
                    if got + len(buffer) + len(chunk) > size:
                        over = True
                        break
                    buffer += chunk
                    if len(buffer) >= CHUNK:
                        await asyncio.to_thread(_write, out, hasher, bytes(buffer))
                        got, buffer = got + len(buffer), bytearray()
            except (ConnectionError, aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError) as e:
                log.info("agent: %s/%s: the sender's body broke off: %s", at.folder, at.name, e)
            if buffer and not over:
                await asyncio.to_thread(_write, out, hasher, bytes(buffer))
                got += len(buffer)
        if over:
            _drop(at)
            return _error(400, f"more than the declared {size} bytes: the partial file was dropped")
        if got < size:
            log.info("agent: %s/%s: the sender stopped at byte %d of %d; kept to resume", at.folder, at.name, got, size)
            return web.json_response({"error": f"the body ended at byte {got} of {size}", "have": got}, status=400)
        got_digest = hasher.hexdigest()
        if digest and got_digest != digest:
            _drop(at)
            return _error(400, f"sha256 of what arrived is {got_digest}, not {digest}: dropped")
        digest = got_digest
        await asyncio.to_thread(_settle, at)
        self.hashes.remember(at.path, digest)
        log.info("agent: received %s/%s (%d bytes, sha256 %s)", at.folder, at.name, size, digest[:12])
        return web.json_response({"folder": at.folder, "name": at.name, "size": size, "sha256": digest}, status=201)

    def sweep(self, now: float | None = None) -> int:
        """Remove partial files nobody resumed within PARTIAL_MAX_AGE; how many."""
        now = now if now is not None else time.time()
        removed = 0
        for bases, _ in model_folders(self.folders()).values():
            for base in bases:
                for root, _, files in os.walk(base):
                    for f in files:
                        path = os.path.join(root, f)
                        if f.endswith(PARTIAL) and now - os.path.getmtime(path) > PARTIAL_MAX_AGE:
                            os.remove(path)
                            removed += 1
        return removed


def _drop(at: Place) -> None:
    """A partial file given up, and the folders made for it if they are now empty."""
    if os.path.isfile(at.partial):
        os.remove(at.partial)
    folder = os.path.dirname(at.path)
    while folder != at.base and folder.startswith(at.base + os.sep):
        try:
            os.rmdir(folder)  # only if empty
        except OSError:
            break
        folder = os.path.dirname(folder)


def _settle(at: Place) -> None:
    """The partial file becomes the model: on disk before it has the model's name (a power
    cut must not leave a truncated file that ComfyUI lists), then the rename made durable."""
    with open(at.partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(at.partial, at.path)
    folder = os.open(os.path.dirname(at.path), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _write(out: Any, hasher: Any, data: bytes) -> None:
    out.write(data)
    out.flush()
    hasher.update(data)


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and _DIGITS.fullmatch(value) else None


def _walk(base: str, extensions: Iterable[str]) -> Iterable[tuple[str, str]]:
    """(name relative to base with '/', path) of each file ComfyUI would list in it."""
    exts = set(extensions)
    for root, dirs, files in os.walk(base, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in exts:
                continue
            path = os.path.join(root, f)
            yield os.path.relpath(path, base).replace(os.sep, "/"), path
