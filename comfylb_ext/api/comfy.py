"""ComfyUI's client API, answered by the coordinator in ComfyUI's exact shapes."""
from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from .. import jobs
from ..dispatcher import Cluster
from ..peer import Peer, PeerError
from ..tasks import RUNNING
from ..uploads import TYPES, InputStore, UploadError, split_annotation
from ..validation import _err, error_body
from ..outputs import Copies, Copy, relay_headers

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_UPLOAD_SIZE = 100 * 1024 * 1024
ANSWER_WITHIN = 5.0  # seconds a slow or dead peer may hold up an answer about the cluster
_FORCE_DOWNLOAD = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}


def bad_request(message: str, details: str = "", typ: str = "invalid_request") -> web.Response:
    return web.json_response(error_body(_err(typ, message, details)), status=400)


def _file_headers(name: str) -> dict[str, str]:
    """The headers ComfyUI's /view sends with a raw file."""
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if ctype in _FORCE_DOWNLOAD:
        ctype = "application/octet-stream"
    return {"Content-Disposition": f'filename="{name}"', "Content-Type": ctype}


def _unreachable(peer: Peer, e: Exception) -> web.Response:
    log.warning("view from %s failed: %s", peer.name, e)
    return web.Response(status=502, text=f"peer {peer.name} unreachable")


def param(request: web.Request, name: str) -> str:
    """A path parameter, whether aiohttp routed the request or the extension's middleware did."""
    params = request.get("comfylb_params")
    return params[name] if params is not None else request.match_info[name]


async def read_json(request: web.Request, *, empty: Any = None) -> Any:
    """The request's JSON body; `empty` if there is none; ValueError if it is not JSON."""
    raw = await request.read()
    if not raw.strip():
        return empty
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"body is not valid JSON: {e}") from None


class ComfyApi:
    def __init__(self, cluster: Cluster, store: InputStore, max_upload_size: int = MAX_UPLOAD_SIZE,
                 own_files: bool = False, on_prompt: Callable[[Any], Any] | None = None) -> None:
        self.cluster = cluster
        self.store = store
        self.max_upload_size = max_upload_size
        # In the extension the host (ComfyUI) serves its own files: view() answers None
        # for anything no peer produced, and the host's handler takes over.
        self.own_files = own_files
        self.on_prompt = on_prompt

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) for every route; hosts add the `/api` twins."""
        return [
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.post_interrupt),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_item),
            ("POST", "/history", self.post_history),
            ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload_image),
            ("POST", "/upload/mask", self.upload_mask),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_node),
            ("GET", "/embeddings", self.union("/embeddings")),
            ("GET", "/extensions", self.union("/extensions")),
            ("GET", "/models", self.union("/models")),
            ("GET", "/models/{folder}", self.models_folder),
            ("GET", "/features", self.features),
            ("POST", "/free", self.free),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/node_replacements", self.node_replacements),
            # ComfyUI declares these with their /api prefix: hosts serve /api/jobs and /api/api/jobs
            ("GET", "/api/jobs", self.get_jobs),
            ("GET", "/api/jobs/{job_id}", self.get_job),
            ("POST", "/api/jobs/{job_id}/cancel", self.cancel_job),
            ("POST", "/api/jobs/cancel", self.cancel_jobs),
        ]

    # -- prompts and queue ---------------------------------------------------------------
    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            data = await read_json(request)
        except ValueError as e:
            return web.json_response(error_body(_err("invalid_prompt", "Invalid JSON in request body", str(e))),
                                     status=400)
        if self.on_prompt is not None:
            data = self.on_prompt(data)
        status, body = self.cluster.submit(data)
        task = self.cluster.tasks.get(body["prompt_id"]) if status == 200 else None
        if task is not None:
            refused = await self.cluster.verdict(task, ANSWER_WITHIN)
            if refused is not None:
                status, body = refused
        return web.json_response(body, status=status)

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.cluster.queue_remaining()}})

    async def get_queue(self, request: web.Request) -> web.Response:
        # Each task's item is serialised once and kept: a queue of thousands answers fast.
        running, pending = self.cluster.queue_snapshot(polled=True)
        body = ('{"queue_running": [' + ", ".join(t.queue_item_json() for t in running) +
                '], "queue_pending": [' + ", ".join(t.queue_item_json() for t in pending) + "]}")
        return web.Response(text=body, content_type="application/json")

    async def _ids_and_clear(self, request: web.Request) -> tuple[bool, list[str]] | web.Response:
        try:
            data = await read_json(request, empty={})
        except ValueError as e:
            return bad_request("Invalid JSON in request body", str(e))
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
            await self.cluster.clear()
        if ids:
            await self.cluster.delete(ids)
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            data = await read_json(request, empty={})
        except ValueError:
            data = {}  # ComfyUI treats an unreadable body as "interrupt everything"
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        await self.cluster.interrupt(str(pid) if pid is not None else None)
        return web.Response(status=200)

    # -- jobs (today's ComfyUI; the newest frontend reads its queue and history only here) --
    async def get_jobs(self, request: web.Request) -> web.Response:
        try:
            q = jobs.parse_query(request.rel_url.query)
        except jobs.JobsError as e:
            return web.json_response(e.body(), status=400)
        running, pending = self.cluster.queue_snapshot()
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
        return web.json_response({"cancelled": await self.cluster.cancel_job(param(request, "job_id"))})

    async def cancel_jobs(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"error": "Request body must be valid JSON"}, status=400)
        try:
            ids = jobs.parse_cancel_ids(body)
        except jobs.JobsError as e:
            return web.json_response(e.body(), status=400)
        cancelled = False
        for job_id in dict.fromkeys(ids):
            cancelled = await self.cluster.cancel_job(job_id) or cancelled
        return web.json_response({"cancelled": cancelled})

    # -- history ---------------------------------------------------------------------------
    async def get_history(self, request: web.Request) -> web.Response:
        q = request.rel_url.query
        try:
            max_items = int(q["max_items"]) if "max_items" in q else None
            offset = int(q.get("offset", -1))
        except ValueError:
            return bad_request("max_items and offset must be integers")
        return web.json_response(self.cluster.history.items(max_items, offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        pid = param(request, "prompt_id")
        entry = self.cluster.history_item(pid)
        return web.json_response({pid: entry} if entry is not None else {})

    async def post_history(self, request: web.Request) -> web.Response:
        parsed = await self._ids_and_clear(request)
        if isinstance(parsed, web.Response):
            return parsed
        clear, ids = parsed
        if clear:
            self.cluster.clear_history()
        if ids:
            self.cluster.delete_history(ids)
        return web.Response(status=200)

    # -- files -------------------------------------------------------------------------------
    async def view(self, request: web.Request) -> web.StreamResponse | None:
        q = request.rel_url.query
        if "filename" not in q:
            return web.Response(status=404)
        name, annotated = split_annotation(q["filename"])
        if not name:
            return web.Response(status=400)
        if name[0] == "/" or ".." in name or "\x00" in name:
            return web.Response(status=400)
        typ = annotated or q.get("type", "output")
        if typ not in TYPES:
            return web.Response(status=400)
        sub = q.get("subfolder", "")
        if os.path.isabs(sub) or ".." in sub.replace("\\", "/").split("/") or "\x00" in sub:
            return web.Response(status=403)
        base = os.path.basename(name)
        peer = self.cluster.producer_of(typ, sub, base)
        if peer is not None and peer.name == self.cluster.outputs.own:
            return None  # written by the ComfyUI this runs in: it serves its own files
        raw = "preview" not in q and q.get("channel", "rgba") == "rgba"
        if typ == "output" and raw:
            cached = self.cluster.outputs.cache.get(sub, base)
            if cached is not None:
                return web.FileResponse(cached, headers=_file_headers(base))
            if peer is not None and self.cluster.outputs.cache.enabled:
                try:
                    copy, upstream = await self.cluster.outputs.open(peer, sub, base)
                except PeerError as e:
                    return _unreachable(peer, e)
                if copy is None:
                    return await self._relay(request, peer, upstream)
                if upstream is not None or await copy.opened():
                    return await self._send_copy(request, copy, upstream)
                # the copy it would have followed was not to be (too large, not there, …)
        if peer is not None:
            return await self._relay(request, peer, "/view?" + request.query_string)
        if self.own_files:
            return None
        stored = self.store.lookup(typ, sub, base)
        if stored is None:
            return web.Response(status=404)
        if raw:
            return web.FileResponse(self.store.path_of(stored), headers=_file_headers(base))
        # A converted view (preview/channel) needs an image library: let a peer do it.
        peer = self.cluster.any_peer()
        if peer is None:
            return web.Response(status=503, text="no peer available to convert the image")
        try:
            await peer.deliver(stored, self.store.path_of(stored))
        except PeerError as e:
            return web.Response(status=502, text=str(e))
        return await self._relay(request, peer, "/view?" + request.query_string)

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

    async def _upload_form(self, request: web.Request):
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
        return web.json_response({"name": f.filename, "subfolder": sub, "type": typ})

    async def upload_mask(self, request: web.Request) -> web.Response:
        """The alpha of the mask goes into the referenced image.  That needs an image
        library, so a peer composites it; the coordinator keeps the result."""
        form = await self._upload_form(request)
        if isinstance(form, web.Response):
            return form
        post, image, typ, data = form
        try:
            ref = json.loads(post.get("original_ref") or "")
            ref_name, ref_type = split_annotation(str(ref["filename"]))
            ref_type = ref_type or ref.get("type") or "input"
            ref_sub = str(ref.get("subfolder") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            return bad_request("original_ref must be JSON naming the image: {\"filename\": ...}")
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
            composited = await _peer_mask(peer, data, image.filename, post.get("original_ref"))
            f = self.store.save(composited, image.filename, sub, typ,
                                overwrite=post.get("overwrite") in ("true", "1"))
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
        try:
            upstream = await peer.open_stream(request.method, request.rel_url.path_qs, headers=headers,
                                              data=await request.read() if request.can_read_body else None)
        except PeerError as e:
            return _unreachable(peer, e)
        return await self._relay(request, peer, upstream)

    # -- node definitions and peer facts -------------------------------------------------------
    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response(await self._catalog())

    async def object_info_node(self, request: web.Request) -> web.Response:
        cls = param(request, "node_class")
        catalog = await self._catalog()
        return web.json_response({cls: catalog[cls]} if cls in catalog else {})

    async def _catalog(self) -> dict:
        """The cluster's nodes; asked of the peers when none has answered yet, but never
        for longer than ANSWER_WITHIN: the web UI gives up on a request after 60 s."""
        catalog = self.cluster.catalog()
        if catalog is None:
            asking = [self.cluster.spawn(self.cluster.refresh_object_info(p)) for p in self._live()]
            if asking:
                await asyncio.wait(asking, timeout=ANSWER_WITHIN)
            catalog = self.cluster.catalog()
        return catalog or {}

    async def node_replacements(self, request: web.Request) -> web.Response:
        await self._catalog()
        return web.json_response(self.cluster.node_replacements())

    def _live(self) -> list[Peer]:
        return [p for p in self.cluster.peers.values() if p.linked and not p.removed]

    def union(self, path: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(await self._union(path))
        return handler

    async def _union(self, path: str) -> list:
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
        known = await self._union("/models")
        if folder not in known:
            return web.Response(status=404)
        return web.json_response(await self._union(f"/models/{folder}"))

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
        return web.json_response({"system": system, "devices": devices})


# ComfyUI routes the standalone balancer does not own; one peer answers them for all.
FORWARDED = ("/users", "/settings", "/userdata", "/v2/userdata", "/internal", "/i18n", "/workflow_templates",
             "/global_subgraphs", "/experiment/models", "/view_metadata")
_FORWARD_HEADERS = ("Content-Type", "Comfy-User", "Accept", "Range")


def forwarded(path: str) -> bool:
    path = path[4:] if path.startswith("/api/") else path
    return any(path == p or path.startswith(p + "/") for p in FORWARDED)


async def _peer_mask(peer: Peer, data: bytes, filename: str, original_ref: Any) -> bytes:

    form = aiohttp.FormData()
    form.add_field("image", data, filename=filename)
    form.add_field("original_ref", str(original_ref))
    form.add_field("subfolder", "comfylb-masks")
    form.add_field("type", "temp")
    form.add_field("overwrite", "true")
    status, body = await peer.request("POST", "/upload/mask", data=form)
    if status != 200 or not isinstance(body, dict):
        raise PeerError(f"mask refused by {peer.name}: HTTP {status}")
    params = {"filename": body["name"], "subfolder": body.get("subfolder", ""), "type": body.get("type", "temp")}
    t = aiohttp.ClientTimeout(total=peer.request_timeout)
    try:
        async with peer.session.get(peer.url + "/view", params=params, timeout=t, headers=peer.headers) as r:
            if r.status != 200:
                raise PeerError(f"composited mask missing on {peer.name}: HTTP {r.status}")
            return await r.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        raise PeerError(str(e)) from e
