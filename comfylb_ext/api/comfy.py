"""ComfyUI's client API, answered by the coordinator in ComfyUI's exact shapes."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import mimetypes
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp import web

from .. import jobs, jsonsafe
from ..access import served_file_headers, without_token
from ..catalog import ANSWER_WITHIN
from ..dispatcher import Cluster
from ..peer import Peer, PeerError, checked_path
from ..store import StoreError
from ..tasks import RUNNING
from ..uploads import TYPES, InputStore, UploadError, split_annotation
from .. import errors
from ..errors import Rejection
from ..outputs import (Copies, Copy, Filling, Following, HostsOwn, OnDisk, Refused, Relayed, Unreachable,
                       find_view, relay_headers)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STANDALONE, EXTENSION = "standalone", "extension"  # the hosts (hosts/standalone.py, hosts/comfyui.py)


@dataclass(frozen=True)
class Route:
    """One route of ComfyUI's API as the cluster answers it."""
    method: str
    path: str  # as ComfyUI declares it: every host answers its `/api` twin too
    handler: Handler
    hosts: frozenset[str] = frozenset({STANDALONE, EXTENSION})  # the hosts that serve it

    def serves(self, host: str) -> bool:
        return host in self.hosts


MAX_UPLOAD_SIZE = 100 * 1024 * 1024
_BODY_MESSAGES = {"size": "Request body too large", "depth": "Request body nested too deeply",
                  "items": "Request body holds too many values", "number": "Request body holds a number JSON does not allow"}


def bad_request(message: str, details: str = "", typ: str = "invalid_request") -> web.Response:
    return web.json_response(errors.error_body(errors.error(typ, message, details)), status=400)


def _file_headers(name: str) -> dict[str, str]:
    """The headers ComfyUI's /view sends with a raw file, and a file that could run script
    as a page here (SVG, HTML, XML, …) as an attachment."""
    return served_file_headers(mimetypes.guess_type(name)[0], name, f'filename="{name}"')


def _unreachable(peer: Peer, e: Exception) -> web.Response:
    log.warning("view from %s failed: %s", peer.name, e)
    return web.Response(status=502, text=f"peer {peer.name} unreachable")


def param(request: web.Request, name: str) -> str:
    """A path parameter, whether aiohttp routed the request or the extension's middleware did."""
    params = request.get("comfylb_params")
    return params[name] if params is not None else request.match_info[name]


class BodyError(ValueError):
    """A request body refused: `status` 413 (too large) or 400 (not acceptable JSON)."""

    def __init__(self, message: str, status: int = 400, reason: str = "syntax") -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, refused (BodyError 413) past `limit` bytes before more is read."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(f"the body is {request.content_length:,} bytes; at most {limit:,} are accepted", 413, "size")
    cached = getattr(request, "_read_bytes", None)
    if request.content_length is not None or cached is not None:
        try:
            raw = await request.read()  # bounded by the Content-Length checked above
        except web.HTTPRequestEntityTooLarge:
            raise BodyError(f"the body is larger than this server accepts ({limit:,} bytes)", 413, "size") from None
    else:  # chunked: read no more than the limit
        body = bytearray()
        async for chunk in request.content.iter_chunked(1 << 20):
            body += chunk
            if len(body) > limit:
                raise BodyError(f"the body is larger than {limit:,} bytes", 413, "size")
        raw = bytes(body)
    if len(raw) > limit:
        raise BodyError(f"the body is larger than {limit:,} bytes", 413, "size")
    return raw


async def read_json(request: web.Request, *, empty: Any = None, max_bytes: int = jsonsafe.MAX_BODY_BYTES) -> Any:
    """The request's JSON body; `empty` if there is none; BodyError (a ValueError) if it is
    not JSON, too large, nested too deep, holds too many values or NaN/Infinity: the
    bounds in jsonsafe (documented there)."""
    raw = await read_body(request, max_bytes)
    if not raw.strip():
        return empty
    try:
        return await jsonsafe.loads_async(raw)
    except jsonsafe.JSONError as e:
        raise BodyError(f"body is not acceptable JSON: {e}", reason=e.reason) from None


def _json(data: Any, status: int = 200) -> web.Response:
    """A JSON answer that never carries NaN or Infinity (see jsonsafe.dumps)."""
    return web.json_response(data, status=status, dumps=jsonsafe.dumps)


ENCODE_BATCH = 4 << 20  # characters of JSON made per trip to a worker thread
STREAM_ABOVE = 8 << 20  # a larger JSON answer is streamed as it is made, never whole in memory


def _encode_some(makers: Iterator[Callable[[], str]]) -> list[str]:
    """In a worker thread: texts from `makers` (at least one) until ENCODE_BATCH characters."""
    out, size = [], 0
    for make in makers:
        out.append(make())
        size += len(out[-1])
        if size >= ENCODE_BATCH:
            break
    return out


class _JsonOut:
    """A JSON answer made piece by piece: an ordinary response while it is small (every
    host's middleware can still add its headers), streamed once it is large."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.parts: list[bytes] = []
        self.size = 0
        self.resp: web.StreamResponse | None = None

    async def add(self, text: str) -> None:
        self.parts.append(text.encode())
        self.size += len(self.parts[-1])
        if self.size >= STREAM_ABOVE:
            if self.resp is None:
                self.resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
                await self.resp.prepare(self.request)
            body, self.parts, self.size = b"".join(self.parts), [], 0
            await self.resp.write(body)

    async def finish(self) -> web.StreamResponse:
        body, self.parts = b"".join(self.parts), []
        if self.resp is None:
            return web.Response(body=body, content_type="application/json")
        await self.resp.write(body)
        await self.resp.write_eof()
        return self.resp


def _history_item(pid: str, entry: dict) -> Callable[[], str]:
    return lambda: f"{json.dumps(pid)}: {jsonsafe.dumps(entry)}"


async def _history_answer(request: web.Request, page: dict) -> web.StreamResponse:
    """{prompt_id: entry, …}, encoded in worker threads (entries never change once added)."""
    out = _JsonOut(request)
    await out.add("{")
    items = list(page.items())
    i = 0
    while i < len(items):
        batch = await asyncio.to_thread(_encode_some, (_history_item(pid, entry) for pid, entry in items[i:]))
        await out.add((", " if i else "") + ", ".join(batch))
        i += len(batch)
    await out.add("}")
    return await out.finish()


class ComfyApi:
    def __init__(self, cluster: Cluster, store: InputStore, max_upload_size: int = MAX_UPLOAD_SIZE,
                 own_files: bool = False, on_prompt: Callable[[Any], Any] | None = None,
                 max_prompt_size: int = jsonsafe.MAX_PROMPT_BYTES) -> None:
        self.cluster = cluster
        self.store = store
        self.max_upload_size = max_upload_size
        self.max_prompt_size = max_prompt_size  # POST /prompt bodies (jsonsafe's docstring says why)
        self._catalog_json: tuple[dict, str] | None = None  # GET /object_info, encoded once per catalog
        # In the extension the host (ComfyUI) serves its own files: view() answers None
        # for anything no peer produced, and the host's handler takes over.
        self.own_files = own_files
        self.on_prompt = on_prompt

    def routes(self) -> list[Route]:
        """Every route of ComfyUI's API the cluster answers, in the order hosts try them;
        each host serves those marked for it, `/x` and `/api/x` alike."""
        # In the extension ComfyUI answers these itself: its uploads land in the folders the
        # cluster reads from, and its web UI wants ComfyUI's own extensions and features.
        mine = frozenset({STANDALONE})
        return [
            Route("POST", "/prompt", self.post_prompt),
            Route("GET", "/prompt", self.get_prompt),
            Route("GET", "/queue", self.get_queue),
            Route("POST", "/queue", self.post_queue),
            Route("POST", "/interrupt", self.post_interrupt),
            Route("GET", "/history", self.get_history),
            Route("GET", "/history/{prompt_id}", self.get_history_item),
            Route("POST", "/history", self.post_history),
            Route("GET", "/view", self.view),
            Route("POST", "/upload/image", self.upload_image, mine),
            Route("POST", "/upload/mask", self.upload_mask, mine),
            Route("GET", "/object_info", self.object_info),
            Route("GET", "/object_info/{node_class}", self.object_info_node),
            Route("GET", "/embeddings", self.union("/embeddings")),
            Route("GET", "/extensions", self.union("/extensions"), mine),
            Route("GET", "/models", self.union("/models")),
            Route("GET", "/models/{folder}", self.models_folder),
            Route("GET", "/features", self.features, mine),
            Route("POST", "/free", self.free),
            Route("GET", "/system_stats", self.system_stats),
            Route("GET", "/node_replacements", self.node_replacements),
            # ComfyUI declares these with their /api prefix: hosts serve /api/jobs and /api/api/jobs
            Route("GET", "/api/jobs", self.get_jobs),
            Route("GET", "/api/jobs/{job_id}", self.get_job),
            Route("POST", "/api/jobs/{job_id}/cancel", self.cancel_job),
            Route("POST", "/api/jobs/cancel", self.cancel_jobs),
        ]

    # -- prompts and queue ---------------------------------------------------------------
    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            data = await read_json(request, max_bytes=self.max_prompt_size)
        except BodyError as e:
            return _json(errors.error_body(errors.error("invalid_prompt", _BODY_MESSAGES.get(e.reason, "Invalid JSON in request body"),
                                         str(e))), status=e.status)
        if self.on_prompt is not None:
            data = self.on_prompt(data)
        try:
            task, node_errors = await self.cluster.submit(data, request.content_length or 0)
        except Rejection as e:
            return _json(e.body, status=e.status)
        refused = await self.cluster.ledger.verdict(task, ANSWER_WITHIN)
        if refused is not None:
            return _json(refused[1], status=refused[0])
        return _json({"prompt_id": task.prompt_id, "number": task.number, "node_errors": node_errors})

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.cluster.ledger.remaining()}})

    async def get_queue(self, request: web.Request) -> web.StreamResponse:
        # Each task's item is serialised once and kept (unless large): a queue of thousands
        # answers fast.  The others are serialised off the event loop, a few MB at a time,
        # and a large answer is streamed: a prompt can be tens of MB.
        running, pending = self.cluster.ledger.snapshot(polled=True)
        out = _JsonOut(request)
        for opening, tasks in (('{"queue_running": [', running), ('], "queue_pending": [', pending)):
            await out.add(opening)
            i = 0
            while i < len(tasks):
                if tasks[i].item_json_made:
                    batch = []
                    for t in itertools.islice(tasks, i, None):
                        if not t.item_json_made:
                            break
                        batch.append(t.queue_item_json())
                else:
                    batch = await asyncio.to_thread(_encode_some, (t.queue_item_json for t in tasks[i:]))
                await out.add((", " if i else "") + ", ".join(batch))
                i += len(batch)
        await out.add("]}")
        return await out.finish()

    async def _ids_and_clear(self, request: web.Request) -> tuple[bool, list[str]] | web.Response:
        try:
            data = await read_json(request, empty={})
        except BodyError as e:
            return _json(errors.error_body(errors.error("invalid_request", _BODY_MESSAGES.get(e.reason, "Invalid JSON in request body"),
                                         str(e))), status=e.status)
        if not isinstance(data, dict):
            return bad_request("Request body must be a JSON object")
        ids = data.get("delete", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return bad_request("delete must be a list of prompt ids")
        return bool(data.get("clear")), ids

    async def post_queue(self, request: web.Request) -> web.Response:
        parsed = await self._ids_and_clear(request)
        if isinstance(parsed, web.Response):
            return parsed
        clear, ids = parsed
        if clear:
            await self.cluster.control.clear()
        if ids:
            await self.cluster.control.delete(ids)
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            data = await read_json(request, empty={})
        except ValueError:
            data = {}  # ComfyUI treats an unreadable body as "interrupt everything"
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        await self.cluster.control.interrupt(str(pid) if pid is not None else None)
        return web.Response(status=200)

    # -- jobs (today's ComfyUI; the newest frontend reads its queue and history only here) --
    async def get_jobs(self, request: web.Request) -> web.Response:
        try:
            q = jobs.parse_query(request.rel_url.query)
        except jobs.JobsError as e:
            return web.json_response(e.body(), status=400)
        running, pending = self.cluster.ledger.snapshot()
        listed = []
        for status, tasks in (("in_progress", running), ("pending", pending)):
            if status in q.statuses:
                listed += [jobs.queue_job(t.queue_item(), status, create_time=t.create_time) for t in tasks]
        history = self.cluster.history.jobs() if q.statuses - jobs.QUEUE_STATUSES else iter(())
        return web.json_response(jobs.list_jobs(listed, history, q))

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = param(request, "job_id")
        entry = self.cluster.history.get(job_id)
        if entry is not None:
            return web.json_response(jobs.history_job(job_id, entry, detail=True))
        task = self.cluster.tasks.get(job_id)
        if task is None:
            return web.json_response({"error": "Job not found"}, status=404)
        status = "in_progress" if task.state == RUNNING else "pending"
        return web.json_response(jobs.queue_detail(task.queue_item(), status, create_time=task.create_time))

    async def cancel_job(self, request: web.Request) -> web.Response:
        return web.json_response({"cancelled": await self.cluster.control.cancel_job(param(request, "job_id"))})

    async def cancel_jobs(self, request: web.Request) -> web.Response:
        try:
            body = await jsonsafe.loads_async(await read_body(request, jsonsafe.MAX_BODY_BYTES))
        except BodyError as e:
            return web.json_response({"error": str(e)}, status=e.status)
        except ValueError:
            return web.json_response({"error": "Request body must be valid JSON"}, status=400)
        try:
            ids = jobs.parse_cancel_ids(body)
        except jobs.JobsError as e:
            return web.json_response(e.body(), status=400)
        cancelled = False
        for job_id in dict.fromkeys(ids):
            cancelled = await self.cluster.control.cancel_job(job_id) or cancelled
        return web.json_response({"cancelled": cancelled})

    # -- history ---------------------------------------------------------------------------
    async def get_history(self, request: web.Request) -> web.StreamResponse:
        q = request.rel_url.query
        try:
            max_items = int(q["max_items"]) if "max_items" in q else None
            offset = int(q.get("offset", -1))
        except ValueError:
            return bad_request("max_items and offset must be integers")
        # Entries never change once added: encoded off the event loop, a few MB at a time,
        # with no copy first (a history of large prompts took seconds of the loop to copy
        # and encode, and several times its size in memory).
        return await _history_answer(request, self.cluster.history.page(max_items, offset))

    async def get_history_item(self, request: web.Request) -> web.StreamResponse:
        pid = param(request, "prompt_id")
        entry = self.cluster.history.peek(pid)
        if entry is None:
            self.cluster.ledger.history_item(pid)  # a miss while the job is live counts as polled
            return web.json_response({})
        self.cluster.polls.forget(pid)  # as history_item() does for a hit, without its copy
        return await _history_answer(request, {pid: entry})

    async def post_history(self, request: web.Request) -> web.Response:
        parsed = await self._ids_and_clear(request)
        if isinstance(parsed, web.Response):
            return parsed
        clear, ids = parsed
        if clear:
            self.cluster.ledger.clear_history()
        if ids:
            self.cluster.ledger.delete_history(ids)
        return web.Response(status=200)

    # -- files -------------------------------------------------------------------------------
    async def view(self, request: web.Request) -> web.StreamResponse:
        return await self.serve_view(request) or web.Response(status=404)

    async def serve_view(self, request: web.Request) -> web.StreamResponse | None:
        """The file a /view names, wherever outputs.find_view says it comes from; None:
        the host serves it (the extension's own ComfyUI)."""
        found = await find_view(self.cluster.outputs, self.store, request.rel_url.query,
                                producer_of=self.cluster.producer_of, any_peer=self.cluster.any_peer,
                                own_files=self.own_files)
        match found:
            case HostsOwn():
                return None
            case Refused(status, text):
                return web.Response(status=status, text=text)
            case OnDisk(path, name):
                return web.FileResponse(path, headers=_file_headers(name))
            case Following(copy):
                return await self._send_copy(request, copy, None)
            case Filling(copy, upstream):
                return await self._send_copy(request, copy, upstream)
            case Relayed(peer, upstream):
                return await self._relay(request, peer,
                                         upstream if upstream is not None else "/view?" + without_token(request))
            case Unreachable(peer, error):
                return _unreachable(peer, error)
        raise AssertionError(f"unhandled view {found!r}")

    async def _send_copy(self, request: web.Request, copy: Copy,
                         upstream: aiohttp.ClientResponse | None) -> web.StreamResponse:
        """A file on its way from its peer, streamed as its bytes arrive; with `upstream`,
        this request takes the copy, from the peer's answer."""
        resp = web.StreamResponse(headers=relay_headers(upstream) if upstream is not None else copy.headers)

        async def send(chunk: bytes) -> None:
            if not resp.prepared:
                await resp.prepare(request)
            await resp.write(chunk)
        if upstream is not None:
            await self.cluster.outputs.copies.fill(copy, upstream, send)
        else:
            async for chunk in copy.read():
                await send(chunk)
        if not copy.ok:
            if not resp.prepared:
                return web.Response(status=502, text="the peer broke off")
            resp.force_close()  # the client sees a short body, never a wrong one
        return resp

    async def _relay(self, request: web.Request, peer: Peer,
                     upstream: str | aiohttp.ClientResponse) -> web.StreamResponse:
        """The peer's answer, streamed through: its reading overlaps the client's."""
        if isinstance(upstream, str):
            try:
                upstream = await peer.open_stream("GET", upstream)
            except PeerError as e:
                return _unreachable(peer, e)
        try:
            resp = web.StreamResponse(status=upstream.status, headers=relay_headers(upstream))
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(Copies.CHUNK):
                    await resp.write(chunk)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("view from %s broke off: %s", peer.name, e)
                resp.force_close()
            return resp
        finally:
            upstream.release()

    async def _upload_form(self, request: web.Request) -> tuple[Any, web.FileField, str, bytes] | web.Response:
        try:
            post = await request.post()
        except Exception as e:  # aiohttp raises several types for a broken multipart body
            return bad_request("Could not read the upload form", str(e)[:200])
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return bad_request("The form needs an 'image' file with a file name")
        typ = str(post.get("type") or "input")
        if typ not in TYPES:
            return bad_request(f"type must be one of {', '.join(TYPES)}", typ)
        data = image.file.read()
        if not data:
            return bad_request("The uploaded file is empty", image.filename)
        return post, image, typ, data

    async def upload_image(self, request: web.Request) -> web.Response:
        form = await self._upload_form(request)
        if isinstance(form, web.Response):
            return form
        post, image, typ, data = form
        sub = str(post.get("subfolder", ""))
        try:
            f = self.store.save(data, image.filename, sub, typ, overwrite=post.get("overwrite") in ("true", "1"))
        except UploadError as e:
            return bad_request("Invalid upload path", str(e))
        try:
            await self.cluster.db.save_input(f.key, f.sha256, data)
        except StoreError as e:
            return upload_not_kept(e)
        return web.json_response({"name": f.filename, "subfolder": sub, "type": typ})

    async def upload_mask(self, request: web.Request) -> web.Response:
        """The alpha of the mask goes into the referenced image.  That needs an image
        library, so a peer composites it; the coordinator keeps the result."""
        form = await self._upload_form(request)
        if isinstance(form, web.Response):
            return form
        post, image, typ, data = form
        try:
            ref = jsonsafe.loads(str(post.get("original_ref") or ""))
            ref_name, ref_type = split_annotation(str(ref["filename"]))
            ref_type = ref_type or ref.get("type") or "input"
            ref_sub = str(ref.get("subfolder") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            return bad_request("original_ref must be JSON naming the image: {\"filename\": ...}")
        if (ref_type not in TYPES or not ref_name or ref_name[0] == "/" or ".." in ref_name or "\x00" in ref_name
                or os.path.isabs(ref_sub) or ".." in ref_sub.replace("\\", "/").split("/") or "\x00" in ref_sub):
            return bad_request("original_ref names no image this server can open", repr(ref)[:200])
        holder = self.cluster.producer_of(ref_type, ref_sub, ref_name)
        stored = self.store.lookup(ref_type, ref_sub, ref_name)
        if holder is None and stored is None:
            return bad_request("The image the mask belongs to is unknown", ref_name)
        peer = holder or self.cluster.any_peer()
        if peer is None:
            return web.Response(status=503, text="no peer available to apply the mask")
        sub = str(post.get("subfolder", ""))
        try:
            if stored is not None and holder is None:
                await peer.deliver(stored, self.store.path_of(stored))
            # the peer reads the image we checked, not whatever else the client's JSON says
            original_ref = json.dumps({"filename": ref_name, "subfolder": ref_sub, "type": ref_type})
            composited = await _peer_mask(peer, data, image.filename, original_ref)
            f = self.store.save(composited, image.filename, sub, typ,
                                overwrite=post.get("overwrite") in ("true", "1"))
            await self.cluster.db.save_input(f.key, f.sha256, composited)
        except StoreError as e:
            return upload_not_kept(e)
        except PeerError as e:
            return web.Response(status=502, text=str(e))
        except UploadError as e:
            return bad_request("Invalid upload path", str(e))
        return web.json_response({"name": f.filename, "subfolder": sub, "type": typ})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """A route one ComfyUI owns (settings, userdata, …): asked of the configured peer."""
        if not forwarded(request.path):
            return web.Response(status=404)
        name = self.cluster.cfg.server.forward_to
        peer = self.cluster.peers.get(name) if name else next(
            (p for p in self.cluster.peers.values() if p.enabled and not p.removed), None)
        if peer is None:
            return web.Response(status=503, text="no peer to answer this (server.forward_to)")
        headers = {h: request.headers[h] for h in _FORWARD_HEADERS if h in request.headers}
        # As the client encoded it (an encoded slash in /userdata/{file} stays one), and
        # only if it names the route it spells: no `..` in any spelling reaches the peer
        # (yarl, a proxy or the peer would resolve it into another of the peer's routes).
        rel = request.rel_url
        query = rel.raw_query_string
        if "token" in rel.query:  # this balancer's credential is not the peer's business
            query = urlencode([(k, v) for k, v in rel.query.items() if k != "token"])
        try:
            target = checked_path(rel.raw_path + (f"?{query}" if query else ""))
        except PeerError as e:
            return web.Response(status=400, text=str(e))
        try:
            upstream = await peer.open_stream(request.method, target, headers=headers,
                                              data=await request.read() if request.can_read_body else None)
        except PeerError as e:
            return _unreachable(peer, e)
        return await self._relay(request, peer, upstream)

    # -- node definitions and peer facts -------------------------------------------------------
    async def object_info(self, request: web.Request) -> web.Response:
        # ~20 MB with many custom nodes: encoded once per catalog, off the event loop
        catalog = await self.catalog()
        cached = self._catalog_json
        if cached is None or cached[0] is not catalog:
            cached = self._catalog_json = (catalog, await jsonsafe.dumps_async(catalog))
        return web.Response(text=cached[1], content_type="application/json")

    async def object_info_node(self, request: web.Request) -> web.Response:
        cls = param(request, "node_class")
        catalog = await self.catalog()
        return web.json_response({cls: catalog[cls]} if cls in catalog else {})

    async def catalog(self) -> dict:
        """The cluster's nodes; asked of the peers when none has answered yet, but never
        for longer than ANSWER_WITHIN: the web UI gives up on a request after 60 s."""
        return await self.cluster.catalog.complete()

    async def node_replacements(self, request: web.Request) -> web.Response:
        await self.catalog()
        return web.json_response(self.cluster.catalog.swaps())

    def _live(self) -> list[Peer]:
        return [p for p in self.cluster.peers.values() if p.linked and not p.removed]

    def union(self, path: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(await self.union_of(path))
        return handler

    async def union_of(self, path: str) -> list:
        """What the live peers list at `path`, each item once."""
        results = await asyncio.gather(*(p.get_json(path, timeout=ANSWER_WITHIN) for p in self._live()),
                                       return_exceptions=True)
        merged: dict = {}
        for r in results:
            if isinstance(r, list):
                for item in r:
                    merged.setdefault(json.dumps(item, sort_keys=True), item)
        return list(merged.values())

    async def models_folder(self, request: web.Request) -> web.Response:
        folder = param(request, "folder")
        known = await self.union_of("/models")
        if folder not in known:
            return web.Response(status=404)
        return web.json_response(await self.union_of("/models/" + quote(folder, safe="")))

    def feature_flags(self) -> dict:
        """What this server supports, for /features and the websocket's feature_flags
        reply: previews are relayed in the form each client asks for; peers' node
        replacements are applied here; no cluster-wide /api/assets, so the newest web
        UI reads its media from /api/jobs."""
        return {"supports_preview_metadata": True, "max_upload_size": self.max_upload_size,
                "node_replacements": True, "assets": False}

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response(self.feature_flags())

    async def free(self, request: web.Request) -> web.Response:
        """POST /free: every peer frees its memory, as one ComfyUI would."""
        try:
            data = await read_json(request, empty={})
        except ValueError as e:
            return bad_request("Invalid JSON in request body", str(e))
        if not isinstance(data, dict):
            return bad_request("Request body must be a JSON object")
        body = {k: bool(data[k]) for k in ("unload_models", "free_memory") if k in data}
        await asyncio.gather(*(p.post_json("/free", body, timeout=10) for p in self._live()), return_exceptions=True)
        return web.Response(status=200)

    async def system_stats(self, request: web.Request) -> web.Response:
        system: dict | None = None
        devices: list[dict] = []
        for p in self.cluster.peers.values():
            stats = p.system_stats
            if not stats or p.removed:
                continue
            if system is None and p.available:
                system = stats.get("system")
            for d in stats.get("devices", []):
                devices.append({**d, "peer": p.name})
        if system is None:
            system = next((p.system_stats.get("system") for p in self.cluster.peers.values()
                           if p.system_stats), {})
        return _json({"system": system, "devices": devices})


# ComfyUI routes the standalone balancer does not own; one peer answers them for all.
FORWARDED = ("/users", "/settings", "/userdata", "/v2/userdata", "/internal", "/i18n", "/workflow_templates",
             "/global_subgraphs", "/experiment/models", "/view_metadata")
_FORWARD_HEADERS = ("Content-Type", "Comfy-User", "Accept", "Range")


def unprefixed(path: str) -> str:
    """ComfyUI serves each route as /x and /api/x alike: the /x."""
    return path[4:] if path.startswith("/api/") else path


def forwarded(path: str) -> bool:
    path = unprefixed(path)
    return any(path == p or path.startswith(p + "/") for p in FORWARDED)


async def _peer_mask(peer: Peer, data: bytes, filename: str, original_ref: str) -> bytes:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=filename)
    form.add_field("original_ref", original_ref)
    form.add_field("subfolder", "comfylb-masks")
    form.add_field("type", "temp")
    form.add_field("overwrite", "true")
    status, body = await peer.request("POST", "/upload/mask", data=form)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise PeerError(f"mask refused by {peer.name}: HTTP {status}")
    params = {"filename": body["name"], "subfolder": str(body.get("subfolder") or ""), "type": "temp"}
    return await peer.get_bytes("/view?" + urlencode(params), max_size=MAX_UPLOAD_SIZE)


def upload_not_kept(e: StoreError) -> web.Response:
    """An upload the shared database did not take is not acknowledged: the next leader
    would lack it."""
    said = errors.error("storage_unavailable", "The upload could not be stored for the cluster; try again shortly.",
                        str(e))
    return web.json_response(errors.error_body(said), status=503)
