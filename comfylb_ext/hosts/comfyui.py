"""The extension host: the core attached to a running ComfyUI's PromptServer.

ComfyUI keeps serving its web UI, websockets, uploads and its own files; a middleware
appended at import time (api.md §4.3) answers the routes that must describe the whole
cluster, for `/x` and `/api/x` alike.  Peer events reach the browser through
PromptServer's own sockets.  Nothing here runs unless ComfyUI is the host.
"""
from __future__ import annotations

import json
import logging
import mimetypes
import os
import re
import uuid
from typing import Any, Awaitable, Callable

from aiohttp import web

from .. import jsonsafe, replacements
from ..access import Access, cross_site_refusal, is_loopback_client, listens_beyond_loopback, served_file_headers
from ..api.comfy import ComfyApi
from ..api.lb import LbApi
from ..config import BackendConfig, Config, ConfigError, load
from ..dispatcher import Cluster
from ..peer import INSTANCE_HEADER
from ..store import StoreError, database_path, open_store
from ..uploads import InputStore, split_annotation

log = logging.getLogger(__name__)

BYPASS = "X-ComfyLB-Local"   # the coordinator's own requests to itself as the `local` peer
LOCAL = "local"

Intercept = Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]],
                     Awaitable[web.StreamResponse]]


class PromptServerHub:
    """The coordinator ComfyUI's own client sockets."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.watchers: dict[str, Any] = {}  # sid → the socket that subscribed (Hub.watch)

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        await self.server.send_json(event, data, sid)

    def watch(self, sid: str) -> bool:
        ws = self.server.sockets.get(sid)
        if ws is not None:
            self.watchers[sid] = ws
        return ws is not None

    async def send_watchers(self, event: str, data: Any) -> None:
        for sid, ws in list(self.watchers.items()):
            if self.server.sockets.get(sid) is not ws:
                # closed, or replaced by a socket that reused the id and did not subscribe
                self.watchers.pop(sid, None)
            else:
                await self.server.send_json(event, data, sid)

    async def send_bytes(self, event: int, payload: bytes, sid: str | None = None) -> None:
        await self.server.send_bytes(event, payload, sid)

    def client_flags(self, sid: str) -> dict:
        flags = (self.server.sockets_metadata.get(sid) or {}).get("feature_flags")
        return flags if isinstance(flags, dict) else {}

    def connected(self, sid: str) -> bool:
        return sid in self.server.sockets


def find_config(here: str) -> str:
    return os.environ.get("COMFYLB_CONFIG") or os.path.join(here, "config.yaml")


class _Prefixed(logging.Filter):
    """ComfyUI's log mixes every custom node's lines: ours say whose they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("ComfyLB:"):
            record.msg = f"ComfyLB: {record.msg}"
        return True


def _prefix_logs() -> None:
    prefix = _Prefixed()
    for name in [n for n in list(logging.root.manager.loggerDict) if n.startswith("comfylb_ext")]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Prefixed) for f in logger.filters):
            logger.addFilter(prefix)


def attach_from_environment(server: Any, here: str) -> Cluster | None:
    """Read the config and attach, or leave ComfyUI exactly as it is and say why in one line
    (and to the panel, through GET /lb/state)."""
    _prefix_logs()
    path = find_config(here)
    if not os.path.exists(path):
        log.info("ComfyLB: no config at %s (set COMFYLB_CONFIG or copy config.example.yaml there); "
                 "ComfyUI runs as usual", path)
        return detached(server, f"no config at {path}: copy config.example.yaml there (or point COMFYLB_CONFIG "
                                "at one), list your peers under backends, then restart ComfyUI", path)
    try:
        cfg = load(path)
    except ConfigError as e:
        log.error("ComfyLB: config error: %s; ComfyUI runs as usual", e)
        return detached(server, f"config error: {e}; fix it, then restart ComfyUI", path)
    if not any(b.enabled for b in cfg.backends) and not cfg.local.enabled:
        log.info("ComfyLB: no enabled peer in %s; ComfyUI runs as usual", path)
        return detached(server, f"no enabled peer in {path}: list your peers under backends, "
                                "then restart ComfyUI", path)
    if any(b.name == LOCAL for b in cfg.backends):
        log.error("ComfyLB: config error: %s: the backend name %r is reserved for the coordinator itself; "
                  "ComfyUI runs as usual", path, LOCAL)
        return detached(server, f"config error: {path}: the backend name {LOCAL!r} is reserved for the "
                                "coordinator itself; rename that peer, then restart ComfyUI", path)
    if not os.path.isabs(cfg.storage.dir):
        cfg.storage.dir = os.path.join(os.path.dirname(os.path.abspath(path)), cfg.storage.dir)
    try:
        return attach(server, cfg)
    except StoreError as e:
        log.error("ComfyLB: state error: %s; ComfyUI runs as usual", e)
        return None


def detached(server: Any, reason: str, path: str) -> None:
    """Not attached: only GET /lb/state answers, so the sidebar tab can say why and where to
    fix it.  A client from elsewhere, while ComfyUI listens beyond localhost, is told less."""
    exposed = listens_beyond_loopback(_comfy_args()[0])

    async def state(request: web.Request) -> web.Response:
        if exposed and not is_loopback_client(request):
            return web.json_response({"attached": False, "reason": "ComfyLB is not attached: see ComfyUI's log"})
        return web.json_response({"attached": False, "reason": reason, "config": path})

    server.routes.get("/lb/state")(state)  # ComfyUI adds the /api twin
    return None


def _comfy_args() -> tuple[str, str | None]:
    """ComfyUI's --listen (the addresses it serves) and --enable-cors-header."""
    try:
        from comfy.cli_args import args  # only inside ComfyUI
    except ImportError:
        return "127.0.0.1", None
    listen = args.listen if args.listen is not None else "127.0.0.1"
    return listen, getattr(args, "enable_cors_header", None)


def _local_address() -> tuple[str, int]:
    from comfy.cli_args import args  # only inside ComfyUI

    listen = (args.listen or "127.0.0.1").split(",")[0].strip()
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(listen, listen)
    return host, int(args.port)


def _no_local_assets() -> None:
    """A newest ComfyUI with assets on tells its web UI to list media from its own asset
    database, which holds none of the peers' outputs: turn the flag off, so the UI lists
    them from /api/jobs, which describes the cluster."""
    try:
        from comfy_api import feature_flags  # only inside ComfyUI
    except ImportError:
        return
    flags = getattr(feature_flags, "SERVER_FEATURE_FLAGS", None)
    if isinstance(flags, dict) and flags.get("assets"):
        flags["assets"] = False
        log.info("ComfyLB: the web UI lists outputs from the cluster's /api/jobs (assets flag off)")


def _compile(path: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")


def attach(server: Any, cfg: Config) -> Cluster:
    import folder_paths  # only inside ComfyUI

    secret = uuid.uuid4().hex
    if cfg.local.enabled:
        host, port = _local_address()
        cfg.backends.append(BackendConfig(name=LOCAL, host=host, port=port, weight=cfg.local.weight,
                                          max_queue=cfg.local.max_queue, headers={BYPASS: secret}))
    store = InputStore({"input": folder_paths.get_input_directory(),
                        "output": folder_paths.get_output_directory(),
                        "temp": folder_paths.get_temp_directory()})
    cluster = Cluster(cfg, PromptServerHub(server), store, open_store(database_path(cfg)))
    cluster.outputs.own = LOCAL if cfg.local.enabled else None
    api = ComfyApi(cluster, store, own_files=True, on_prompt=server.trigger_on_prompt)

    def cluster_only(handler) -> Intercept:
        """The cluster answers; the coordinator's own handler is not asked."""
        async def intercept(request, original):
            return await handler(request)
        return intercept

    async def view(request, original):
        resp = await api.view(request)
        if resp is not None:
            return resp
        resp = await original(request)  # a file of this ComfyUI's own
        if resp.status == 200 and not resp.prepared:
            # ComfyUI 0.3.75 shows an SVG (and XML, XSL) inline: a script in it would run as this origin
            name = os.path.basename(split_annotation(request.rel_url.query.get("filename", ""))[0])
            resp.headers.update(served_file_headers(resp.headers.get("Content-Type") or mimetypes.guess_type(name)[0],
                                                    name, resp.headers.get("Content-Disposition")))
        return resp

    async def interrupt(request, original):
        try:
            data = jsonsafe.loads(await request.read() or b"{}")
        except ValueError:
            data = {}
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        if pid is not None and str(pid) not in cluster.tasks:
            return await original(request)  # not ours: ComfyUI's own prompt
        if not await cluster.interrupt(str(pid) if pid is not None else None) and pid is None:
            return await original(request)  # nothing of ours runs: whatever this ComfyUI runs
        return web.Response(status=200)

    async def local_json(request, original) -> Any:
        """This ComfyUI's own answer, or None (a route it lacks raises HTTPNotFound)."""
        try:
            resp = await original(request)
            body = resp.body if isinstance(resp, web.Response) and resp.content_type == "application/json" else None
            return json.loads(body) if resp.status == 200 and body else None  # a static file: not an API answer
        except (web.HTTPException, ValueError):
            return None

    async def object_info(request, original):
        local = await local_json(request, original) or {}
        return web.json_response({**local, **await api._catalog()})

    async def object_info_node(request, original):
        peers = await api._catalog()
        cls = request["comfylb_params"]["node_class"]
        if cls in peers:
            return web.json_response({cls: peers[cls]})
        return await original(request)

    def union(path: str) -> Intercept:
        async def intercept(request, original):
            local = await local_json(request, original)
            merged = {json.dumps(x, sort_keys=True): x for x in (local or []) + await api._union(path)}
            return web.json_response(list(merged.values()))
        return intercept

    async def models_folder(request, original):
        folder = request["comfylb_params"]["folder"]
        local = await local_json(request, original)
        remote = await api._union(f"/models/{folder}") if folder in await api._union("/models") else None
        if local is None and remote is None:
            return web.Response(status=404)
        merged = {json.dumps(x, sort_keys=True): x for x in (local or []) + (remote or [])}
        return web.json_response(list(merged.values()))

    async def node_replacements(request, original):
        local = replacements.parse(await local_json(request, original))
        await api._catalog()
        return web.json_response(replacements.merge([local, cluster.node_replacements()]))

    async def free(request, original):
        await api.free(request)  # the peers free theirs; this ComfyUI its own
        return await original(request)

    async def system_stats(request, original):
        local = await local_json(request, original) or {}
        devices = [dict(d, peer=LOCAL) for d in local.get("devices", [])] if cfg.local.enabled else []
        for p in cluster.peers.values():
            if p.name != LOCAL and p.system_stats and not p.removed:
                devices += [dict(d, peer=p.name) for d in p.system_stats.get("devices", [])]
        return web.json_response({"system": local.get("system", {}), "devices": devices})

    table: list[tuple[str, str, Intercept]] = [
        ("POST", "/prompt", cluster_only(api.post_prompt)),
        ("GET", "/prompt", cluster_only(api.get_prompt)),
        ("GET", "/queue", cluster_only(api.get_queue)),
        ("POST", "/queue", cluster_only(api.post_queue)),
        ("POST", "/interrupt", interrupt),
        ("GET", "/history", cluster_only(api.get_history)),
        ("GET", "/history/{prompt_id}", cluster_only(api.get_history_item)),
        ("POST", "/history", cluster_only(api.post_history)),
        ("GET", "/view", view),
        ("GET", "/object_info", object_info),
        ("GET", "/object_info/{node_class}", object_info_node),
        ("GET", "/embeddings", union("/embeddings")),
        ("GET", "/models", union("/models")),
        ("GET", "/models/{folder}", models_folder),
        ("GET", "/system_stats", system_stats),
        ("POST", "/free", free),
        ("GET", "/node_replacements", node_replacements),
    ]
    # The jobs API, whether or not this ComfyUI has its own: /api/jobs arrives here as
    # /jobs (the middleware strips /api), and ComfyUI's /api/api/jobs twin as /api/jobs.
    for method, path, handler in api.routes():
        if path.startswith("/api/"):
            table += [(method, path[4:], cluster_only(handler)), (method, path, cluster_only(handler))]
    compiled = [(m, _compile(p), h) for m, p, h in table]
    # ComfyUI's --listen decides who can reach /lb/*: beyond localhost, a token or this machine only
    listen, cors = _comfy_args()
    access = Access.of(cfg, loopback_only=listens_beyond_loopback(listen) and not cfg.auth.allow_open,
                       api_origins=frozenset({cors.strip().lower().rstrip("/")}) if cors else frozenset(),
                       cookie_paths=("/lb", "/api/lb"))
    log.info("ComfyLB: %s", access.describe(api=False))

    @web.middleware
    async def comfylb_middleware(request: web.Request, handler):
        if request.headers.get(BYPASS) == secret:
            return await handler(request)
        path = request.path[4:] if request.path.startswith("/api/") else request.path
        for method, pattern, intercept in compiled:
            if method == request.method:
                m = pattern.match(path)
                if m is not None:
                    if not access.origin_ok(request, api=True):
                        return cross_site_refusal(path)  # a page elsewhere must not queue on (or stop) the peers
                    request["comfylb_params"] = m.groupdict()
                    return await intercept(request, handler)
        return await handler(request)

    server.app.middlewares.append(comfylb_middleware)

    async def sign(request: web.Request, response: web.StreamResponse) -> None:
        if request.headers.get(BYPASS) != secret:  # the `local` peer is this ComfyUI on purpose
            response.headers[INSTANCE_HEADER] = cluster.instance_id  # a configured peer that is us is refused
    server.app.on_response_prepare.append(sign)
    for method, path, handler in LbApi(cluster, access).routes():
        server.routes.route(method, path)(handler)  # ComfyUI adds the /api twin
    server.get_queue_info = lambda: {"exec_info": {"queue_remaining": cluster.queue_remaining()}}
    _no_local_assets()

    async def start(app: web.Application) -> None:
        await cluster.start()

    async def stop(app: web.Application) -> None:
        await cluster.stop()

    server.app.on_startup.append(start)
    server.app.on_cleanup.append(stop)
    names = [b.name for b in cfg.backends if b.enabled]
    log.info("ComfyLB: prompts sent to this ComfyUI run on %d peer(s): %s%s", len(names), ", ".join(names),
             "" if cfg.local.enabled else " (not on this machine: local.enabled is false)")
    return cluster
