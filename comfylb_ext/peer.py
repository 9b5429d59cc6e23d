"""One peer ComfyUI: its settings, state, counters and the link that talks to it.

The link is HTTP plus ONE long-lived websocket under the coordinator's own client id:
every prompt is submitted with that id, so the peer sends its execution events here and
the dispatcher relays them to the client that submitted the prompt.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import unquote

import aiohttp
from yarl import URL

from . import jsonsafe
from .capability import Capabilities, Requirements
from .config import BackendConfig, peer_headers
from .health import HealthState
from .scheduler import PeerView
from .tasks import Task
from .uploads import StoredFile

log = logging.getLogger(__name__)

FEATURE_FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0
JOB_TIME_WEIGHT = 0.3  # of the newest job in the moving average
# What a peer may send, at most.  A websocket message: previews and SaveImageWebsocket's
# images are the largest (a 4K PNG is ~25 MB); larger closes the link.  An HTTP answer read
# whole: /object_info with many custom nodes is ~20 MB, a /history entry holds a prompt
# (at most jsonsafe.MAX_PROMPT_BYTES); /system_stats and the like are far smaller.
WS_MAX_MESSAGE = 64 << 20
MAX_BODY = jsonsafe.PEER_MAX_BYTES
SMALL_BODY = 1 << 20  # /system_stats, /node_replacements, /models …
# Seconds between pings on the link when nothing arrives; a peer that does not answer one
# within half of this (it stopped reading, or hangs) has lost its link.
HEARTBEAT = 10.0


def checked_path(path: str) -> str:
    """A path (and query) to send to a peer, refused (PeerError) unless it names exactly
    the route it spells: no scheme or host, no control characters, and no `.` or `..`
    segment in any spelling (`%2e%2e`, or inside an encoded slash `..%2F`, which a proxy
    in front of the peer may decode) that the URL library or the peer would resolve into
    another route.  A `#` is sent encoded: it cannot end a request's target."""
    path = path.replace("#", "%23")
    route, _, _ = path.partition("?")
    if not route.startswith("/") or route.startswith("//"):
        raise PeerError(f"refusing to send {path[:80]!r} to a peer: not a plain path")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise PeerError(f"refusing to send {path[:80]!r} to a peer: control characters")
    for segment in route.split("/"):
        if "." in unquote(segment) and {".", ".."} & set(unquote(segment).replace("\\", "/").split("/")):
            raise PeerError(f"refusing to send {path[:80]!r} to a peer: '.' or '..' in the path")
    return path


class PeerListener(Protocol):
    async def on_link_up(self, peer: "Peer") -> None: ...
    async def on_link_down(self, peer: "Peer", reason: str) -> None: ...
    async def on_message(self, peer: "Peer", msg: dict) -> None: ...
    async def on_binary(self, peer: "Peer", data: bytes) -> None: ...


# Every answer of a ComfyLB carries its instance id: a "peer" answering with ours is this
# very process (ComfyUI's default address copied into the coordinator's own config).
INSTANCE_HEADER = "X-ComfyLB-Instance"


def unreachable(e: BaseException, url: str, timeout: float | None = None) -> str:
    """Why a peer could not be reached, for people rather than as a library's exception."""
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer from {url}" + (f" within {timeout:g} s" if timeout else "")
    if isinstance(e, aiohttp.ClientConnectorDNSError if hasattr(aiohttp, "ClientConnectorDNSError") else ()):
        return f"host name of {url} not found"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return f"{url}: its TLS certificate is not trusted"
    if isinstance(e, aiohttp.ClientConnectorError):
        cause = e.os_error
        if isinstance(cause, ConnectionRefusedError):
            return f"nothing listens at {url} (connection refused)"
        if "Name or service not known" in str(cause) or "nodename nor servname" in str(cause):
            return f"host name of {url} not found"
        return f"cannot connect to {url}: {cause.strerror or cause}"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return f"{url} closed the connection"
    if isinstance(e, aiohttp.WSServerHandshakeError):
        return f"{url} refused the websocket (HTTP {e.status}): is it ComfyUI?"
    return f"cannot talk to {url}: {e.__class__.__name__}: {e}".rstrip(": ")


class PeerError(Exception):
    """The peer could not be reached or answered nonsense."""


class Peer:
    def __init__(self, cfg: BackendConfig, session: aiohttp.ClientSession, client_id: str,
                 listener: PeerListener, request_timeout: float = 30.0) -> None:
        self.cfg = cfg
        self.headers = peer_headers(cfg)
        self.session = session
        self.client_id = client_id
        self.listener = listener
        self.request_timeout = request_timeout
        self.enabled = cfg.enabled
        self.removed = False
        self.health = HealthState()
        self.checks = 0
        self.linked = False
        self.link_error: str | None = None
        # Prompts that count against max_queue: sent, not yet terminal on the peer.
        self.inflight: dict[str, Task] = {}
        # Prompts whose events we still relay (inflight + finishing: terminal event seen,
        # history not yet recorded).
        self.tasks: dict[str, Task] = {}
        self.running: str | None = None
        self.last_pick = -1
        self.jobs_done = 0
        self.jobs_failed = 0
        self.job_time_total = 0.0
        self.job_time: float | None = None  # moving average (EWMA) of recent job times
        # moving average of its run times over the cost model's predictions: how much
        # slower (>1) or faster than the cluster's typical peer it runs the same work
        self.pace: float | None = None
        self.models: frozenset = frozenset()  # model files of the last prompt sent here
        self.cached: frozenset = frozenset()  # its cache keys: what the peer's cache will hold
        self.freed_at: float | None = None  # when it last freed a slot while work waited (dispatch gap)
        self.prefetching = asyncio.Semaphore(2)  # outputs copied from it at once
        self.progress: dict | None = None  # the running prompt's latest `progress` event
        self.object_info: dict | None = None
        self.caps: Capabilities | None = None  # None until its /object_info is known: then anything goes
        self.replacements: dict[str, list[dict]] = {}  # its /node_replacements (today's ComfyUI)
        self.answered_by: str | None = None  # the ComfyLB instance behind its address, if any (INSTANCE_HEADER)
        self.source = "config"  # or "runtime": added by POST /lb/backends, kept in the state database
        # or "worker": a local worker (workers.py), whose process state this tells
        self.worker: Callable[[], dict] | None = None
        self.system_stats: dict | None = None
        self.delivered: dict[tuple[str, str, str], str] = {}
        # Prompts taken back from this peer while it was away; dropped from its queue when it returns.
        self.abandoned: set[str] = set()
        self.jobs_api = True  # until it answers /api/jobs with a 404 (ComfyUI before the jobs API)
        self.agent: bool | None = None  # runs a ComfyLB agent that takes our secret (transfers.Agents.probe)
        self._ws_task: asyncio.Task | None = None
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None

    # -- state -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def url(self) -> str:
        return self.cfg.url

    @property
    def available(self) -> bool:
        return self.enabled and not self.removed and self.linked and self.health.healthy

    @property
    def mean_job_time(self) -> float | None:
        return self.job_time_total / self.jobs_done if self.jobs_done else None

    def record_job(self, seconds: float, predicted: float | None = None) -> None:
        self.jobs_done += 1
        self.job_time_total += seconds
        self.job_time = seconds if self.job_time is None else (1 - JOB_TIME_WEIGHT) * self.job_time + JOB_TIME_WEIGHT * seconds
        if predicted:
            pace = seconds / predicted
            self.pace = pace if self.pace is None else (1 - JOB_TIME_WEIGHT) * self.pace + JOB_TIME_WEIGHT * pace

    @property
    def tags(self) -> list[str]:
        return self.cfg.tags

    def matches(self, targets: frozenset[str] | None) -> bool:
        """Whether a routing rule (peer names or tags) lets a prompt run here."""
        return targets is None or self.name in targets or not targets.isdisjoint(self.cfg.tags)

    def can_run(self, req: Requirements | None) -> bool:
        return req is None or self.caps is None or self.caps.can_run(req)

    def view(self, max_queue: int | None = None) -> PeerView:
        """Its state for the scheduler; `max_queue` caps its own (a dispatch order that
        wants prompts to wait in the coordinator)."""
        return PeerView(self.name, len(self.inflight), min(self.cfg.max_queue, max_queue or self.cfg.max_queue),
                        self.cfg.weight,
                        self.available, self.last_pick, self.job_time, self.models, self.cached)

    def assign(self, task: Task) -> None:
        self.inflight[task.prompt_id] = task
        self.tasks[task.prompt_id] = task

    def release(self, prompt_id: str) -> Task | None:
        """The prompt no longer occupies a slot on this peer."""
        if self.running == prompt_id:
            self.running = None
        return self.inflight.pop(prompt_id, None)

    def forget(self, prompt_id: str) -> Task | None:
        self.release(prompt_id)
        return self.tasks.pop(prompt_id, None)

    # -- websocket ---------------------------------------------------------------
    def start(self) -> None:
        self._ws_task = asyncio.create_task(self._ws_loop(), name=f"comfylb-peer-{self.name}")

    async def stop(self) -> None:
        if self._ws_task:
            self._ws_task.cancel()
            await asyncio.gather(self._ws_task, return_exceptions=True)
            self._ws_task = None

    async def _ws_loop(self) -> None:
        delay = BACKOFF_MIN
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        while True:
            linked_at = None
            try:
                async with self.session.ws_connect(ws_url, heartbeat=HEARTBEAT, max_msg_size=WS_MAX_MESSAGE,
                                                   headers=self.headers,
                                                   timeout=aiohttp.ClientWSTimeout(ws_close=5.0)) as ws:
                    self._ws = ws
                    await ws.send_json(FEATURE_FLAGS)
                    self.linked, self.link_error = True, None
                    linked_at = time.monotonic()
                    log.info("peer %s: linked (%s)", self.name, self.url)
                    await self.listener.on_link_up(self)
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            try:
                                data = await _parse(msg.data)
                            except ValueError as e:
                                log.warning("peer %s: message ignored: %s", self.name, e)
                                continue
                            if _well_formed(data):
                                await self.listener.on_message(self, data)
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            if _well_formed_binary(msg.data):
                                await self.listener.on_binary(self, msg.data)
                        elif msg.type == aiohttp.WSMsgType.ERROR:
                            break
                    # a message over WS_MAX_MESSAGE, a ping not answered, …
                    error = ws.exception()
                    reason = f"websocket closed ({ws.close_code})" + (f": {error}" if error else "")
            except asyncio.CancelledError:
                await self._link_lost("coordinator stopping")
                raise
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                reason = unreachable(e, self.url)
            except Exception as e:  # a bug in a handler must not kill the link for good
                log.exception("peer %s: error while handling its events", self.name)
                reason = f"internal error: {e!r}"
            finally:
                self._ws = None
            await self._link_lost(reason)
            if linked_at is not None and time.monotonic() - linked_at >= BACKOFF_MAX:
                delay = BACKOFF_MIN  # it was up a while: back as soon as it is (a peer that drops
                # its link at once, each time, is asked again less and less often)
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _link_lost(self, reason: str) -> None:
        was = self.linked
        self.linked, self.link_error = False, reason
        if was:
            log.warning("peer %s: link lost: %s", self.name, reason)
            await self.listener.on_link_down(self, reason)

    # -- HTTP --------------------------------------------------------------------
    def _url(self, path: str) -> URL:
        return URL(self.url + checked_path(path))

    async def request(self, method: str, path: str, *, timeout: float | aiohttp.ClientTimeout | None = None,
                      max_size: int = MAX_BODY, headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any]:
        """One HTTP call; returns (status, parsed JSON or text).  PeerError when unreachable,
        or when it answers more than `max_size` bytes, or JSON nested too deep, holding too
        many values or NaN (jsonsafe's peer limits).  `timeout`: seconds for the whole call,
        or an aiohttp timeout (a body streamed for minutes)."""
        t = timeout if isinstance(timeout, aiohttp.ClientTimeout) else \
            aiohttp.ClientTimeout(total=timeout or self.request_timeout)
        try:
            async with self.session.request(method, self._url(path), timeout=t,
                                            headers={**(headers or {}), **self.headers}, **kw) as r:
                self.answered_by = r.headers.get(INSTANCE_HEADER)
                body = await _read(r, max_size)
                if "json" in (r.content_type or ""):
                    try:
                        return r.status, await _parse(body)
                    except ValueError as e:
                        log.warning("peer %s: %s %s: unusable JSON: %s", self.name, method, path, e)
                return r.status, body.decode("utf-8", "replace")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise PeerError(f"{method} {path}: {unreachable(e, self.url, t.total or t.sock_read)}") from e

    async def get_json(self, path: str, timeout: float | None = None, max_size: int = MAX_BODY) -> Any:
        status, body = await self.request("GET", path, timeout=timeout, max_size=max_size)
        if status != 200 or isinstance(body, str):
            if path == "/system_stats" and status in (404, 405):
                raise PeerError(f"{self.url} answers, but is not ComfyUI (no /system_stats: HTTP {status})")
            raise PeerError(f"GET {path}: HTTP {status}" + (": not usable JSON" if status == 200 else ""))
        return body

    async def post_json(self, path: str, data: Any, timeout: float | None = None) -> tuple[int, Any]:
        def encode() -> bytes:
            return jsonsafe.dumps(data).encode()
        # a prompt can be large: encoded off the event loop
        body = await asyncio.to_thread(encode) if isinstance(data, dict) and "prompt" in data else encode()
        return await self.request("POST", path, data=body, timeout=timeout,
                                  headers={"Content-Type": "application/json"})

    async def get_bytes(self, path: str, max_size: int = MAX_BODY, timeout: float | None = None) -> bytes:
        """A file from the peer (at most `max_size` bytes); PeerError unless it answers 200."""
        t = aiohttp.ClientTimeout(total=timeout or self.request_timeout)
        try:
            async with self.session.get(self._url(path), timeout=t, headers=self.headers) as r:
                if r.status != 200:
                    raise PeerError(f"GET {path}: HTTP {r.status}")
                return bytes(await _read(r, max_size))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise PeerError(f"GET {path}: {e.__class__.__name__}: {e}".rstrip(": ")) from e

    async def deliver(self, f: StoredFile, path: Path) -> None:
        """Make sure an input the coordinator holds is on this peer, byte for byte."""
        if self.delivered.get(f.key) == f.sha256:
            return
        form = aiohttp.FormData()
        form.add_field("image", path.read_bytes(), filename=f.filename)
        form.add_field("overwrite", "true")
        form.add_field("subfolder", f.subfolder)
        form.add_field("type", f.type)
        status, body = await self.request("POST", "/upload/image", data=form)
        if status != 200:
            raise PeerError(f"upload of {f.filename!r} refused: HTTP {status} {str(body)[:200]}")
        self.delivered[f.key] = f.sha256
        log.debug("peer %s: delivered %s", self.name, f.key)

    async def open_stream(self, method: str, path: str, headers: dict[str, str] | None = None,
                          **kw: Any) -> aiohttp.ClientResponse:
        """A response to stream through (caller releases it)."""
        try:
            return await self.session.request(method, self._url(path), headers={**(headers or {}), **self.headers},
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout,
                                                                            sock_read=self.request_timeout), **kw)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise PeerError(f"{method} {path}: {e.__class__.__name__}: {e}") from e

    @property
    def status(self) -> str:
        """One word for people: removed, disabled, down (link lost), or the health state."""
        if self.removed:
            return "removed"
        if not self.enabled:
            return "disabled"
        if not self.linked and self.health.state != "unknown":
            return "down"
        return self.health.state

    async def held(self) -> tuple[set[str], set[str]]:
        """(running, pending) prompt ids in the peer's own queue.  PeerError if unreachable.

        Asked of today's jobs API, whose list holds no prompts; a ComfyUI without it
        (404) is asked for its /queue, which holds every prompt it queues."""
        if self.jobs_api:
            status, body = await self.request("GET", "/api/jobs?status=in_progress,pending")
            jobs = body.get("jobs") if status == 200 and isinstance(body, dict) else None
            if isinstance(jobs, list):
                ids: dict[str, set[str]] = {"in_progress": set(), "pending": set()}
                for job in jobs:
                    if isinstance(job, dict) and isinstance(job.get("id"), str) and job.get("status") in ids:
                        ids[job["status"]].add(job["id"])
                return ids["in_progress"], ids["pending"]
            if status not in (200, 404, 405):  # 200 without a job list: not the jobs API either
                raise PeerError(f"GET /api/jobs: HTTP {status}")
            self.jobs_api = False
        q = await self.get_json("/queue", max_size=4 * MAX_BODY)
        if not isinstance(q, dict):
            raise PeerError("GET /queue: not a JSON object")
        ids = {key: {item[1] for item in (q[key] if isinstance(q.get(key), list) else [])
                     if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)}
               for key in ("queue_running", "queue_pending")}
        return ids["queue_running"], ids["queue_pending"]

    async def withdraw(self, prompt_ids: list[str]) -> set[str]:
        """Delete prompts from the peer's queue; returns those it still holds (they had
        started).  PeerError if unreachable."""
        await self.post_json("/queue", {"delete": prompt_ids})
        running, pending = await self.held()
        return (running | pending) & set(prompt_ids)

    def describe(self) -> dict:
        return jsonsafe.finite({"status": self.status,
            "name": self.name, "url": self.url, "host": self.cfg.host, "port": self.cfg.port,
            "weight": self.cfg.weight, "max_queue": self.cfg.max_queue, "enabled": self.enabled, "tags": self.cfg.tags,
            "scheme": self.cfg.scheme, "source": self.source, "removed": self.removed, "linked": self.linked, "available": self.available,
            "health": {"state": self.health.state, "last_error": self.health.last_error or self.link_error,
                       "changed_at": self.health.changed_at, "checked_at": self.health.checked_at},
            "in_flight": len(self.inflight), "running": self.running, "progress": self.progress,
            "jobs_done": self.jobs_done, "jobs_failed": self.jobs_failed, "mean_job_time": self.mean_job_time,
            "recent_job_time": self.job_time, "models": sorted(self.models),
            "devices": (self.system_stats or {}).get("devices", []),
            "worker": self.worker() if self.worker is not None else None,
            "agent": self.agent,
            "at": time.time(),
        })  # never NaN, whatever came in (the panel's JSON.parse refuses it)


def clean_system_stats(stats: dict) -> dict:
    """A peer's /system_stats as the cluster shows it: `system` an object, `devices` a
    list of objects; anything else in its place counts as none, so one peer's odd answer
    cannot break GET /system_stats or the panel for everyone."""
    system, devices = stats.get("system"), stats.get("devices")
    if not (isinstance(devices, list) and all(isinstance(d, dict) for d in devices)):
        devices = []
    return {**stats, "system": system if isinstance(system, dict) else {}, "devices": devices}


def _well_formed(message: Any) -> bool:
    """A peer's event as ComfyUI sends one: {"type": str, "data": ...}, where a prompt_id,
    if any, is a string (an odd one must not break the link it came on)."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return False
    data = message.get("data")
    return not isinstance(data, dict) or isinstance(data.get("prompt_id"), (str, type(None)))


PREVIEW_WITH_METADATA = 4


def _well_formed_binary(frame: bytes) -> bool:
    """A binary event: a 4-byte type; a preview with metadata (type 4) carries a 4-byte
    length and that much JSON (bounded, its prompt_id a string) before the image."""
    if len(frame) < 4:
        return False
    if int.from_bytes(frame[:4], "big") != PREVIEW_WITH_METADATA:
        return True
    if len(frame) < 8:
        return False
    size = int.from_bytes(frame[4:8], "big")
    try:
        meta = jsonsafe.peer_loads(frame[8:8 + size])
    except ValueError:
        return False
    return isinstance(meta, dict) and isinstance(meta.get("prompt_id"), (str, type(None)))


async def _read(r: aiohttp.ClientResponse, limit: int) -> bytearray:
    """A peer's answer, refused (PeerError) as soon as it is known to exceed `limit` bytes."""
    if r.content_length is not None and r.content_length > limit:
        raise PeerError(f"{r.method} {r.url.path}: answer of {r.content_length:,} bytes (at most {limit:,})")
    body = bytearray()
    async for chunk in r.content.iter_chunked(1 << 20):
        body += chunk
        if len(body) > limit:
            raise PeerError(f"{r.method} {r.url.path}: answer larger than {limit:,} bytes")
    return body


async def _parse(raw: bytes | bytearray | str) -> Any:
    """JSON from a peer, within jsonsafe's peer limits (ValueError otherwise); a large
    one is parsed off the event loop."""
    if len(raw) > jsonsafe.THREAD_ABOVE:
        return await asyncio.to_thread(jsonsafe.peer_loads, raw)
    return jsonsafe.peer_loads(raw)


def why_unavailable(peers: list[Peer]) -> str:
    """Why none of these peers takes work, for people."""
    if not peers:
        return "no peer is configured (add one under backends in the config, or POST /lb/backends)"
    def state(p: Peer) -> str:
        error = p.health.last_error or p.link_error
        return f"{p.name} is {p.status}" + (f" ({error})" if p.status not in ("disabled", "healthy") and error else "")
    return "no peer is available: " + "; ".join(state(p) for p in peers)
