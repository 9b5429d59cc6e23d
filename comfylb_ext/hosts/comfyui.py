"""The extension host: the core attached to a running ComfyUI's PromptServer.

ComfyUI keeps serving its web UI, websockets, uploads and its own files; a middleware
appended at import time (api.md §4.3) answers the routes that must describe the whole
cluster, for `/x` and `/api/x` alike.  Peer events reach the browser through
PromptServer's own sockets.  Nothing here runs unless ComfyUI is the host.
"""
from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
import re
import sys
import threading
import uuid
from typing import Any, Awaitable, Callable

from aiohttp import web

from .. import jsonsafe, replacements
from ..access import Access, cross_site_refusal, is_loopback_client, listens_beyond_loopback, served_file_headers
from ..api.comfy import EXTENSION, ComfyApi, Handler, Route, unprefixed, upload_not_kept
from ..api.lb import LbApi
from ..config import BackendConfig, Config, ConfigError, ServerConfig, load
from ..dispatcher import Cluster
from ..peer import INSTANCE_HEADER
from ..edge import Edge
from ..proxy import Forwarder
from ..leadership import Leadership
from ..pgstore import open_store
from ..store import StoreError
from ..uploads import InputStore, split_annotation
from ..workers import WORKER_ENV, Install, Workers, detect_gpus, knows_flag, resolve

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
    if os.environ.get(WORKER_ENV):
        log.info("ComfyLB: this ComfyUI is %s, a local worker of a coordinator: not attaching",
                 os.environ[WORKER_ENV])
        return None
    path = find_config(here)
    if not os.path.exists(path):
        log.info("ComfyLB: no config at %s (set COMFYLB_CONFIG or copy config.example.yaml there); "
                 "ComfyUI runs as usual", path)
        detached(server, f"no config at {path}: copy config.example.yaml there (or point COMFYLB_CONFIG "
                                "at one), list your peers under backends, then restart ComfyUI", path)
        return None
    try:
        cfg = load(path)
    except ConfigError as e:
        log.error("ComfyLB: config error: %s; ComfyUI runs as usual", e)
        detached(server, f"config error: {e}; fix it, then restart ComfyUI", path)
        return None
    if cfg.role == "peer":
        serve_agent(server, cfg, path)
        return None
    if not any(b.enabled for b in cfg.backends) and not cfg.local.enabled and not cfg.workers.enabled:
        log.info("ComfyLB: no enabled peer in %s; ComfyUI runs as usual", path)
        detached(server, f"no enabled peer in {path}: list your peers under backends, "
                                "then restart ComfyUI", path)
        return None
    if any(b.name == LOCAL for b in cfg.backends):
        log.error("ComfyLB: config error: %s: the backend name %r is reserved for the coordinator itself; "
                  "ComfyUI runs as usual", path, LOCAL)
        detached(server, f"config error: {path}: the backend name {LOCAL!r} is reserved for the "
                                "coordinator itself; rename that peer, then restart ComfyUI", path)
        return None
    if not os.path.isabs(cfg.storage.dir):
        cfg.storage.dir = os.path.join(os.path.dirname(os.path.abspath(path)), cfg.storage.dir)
    try:
        return attach(server, cfg, _lead(cfg))
    except StoreError as e:
        log.error("ComfyLB: state error: %s; ComfyUI runs as usual", e)
        detached(server, f"state error: {e}", path)
        return None


def serve_agent(server: Any, cfg: Config, path: str) -> None:
    """role: peer — this ComfyUI is a peer: ComfyLB lists, serves and receives its model
    files for the coordinator (agent.py) and balances nothing."""
    from ..agent import Agent

    agent = Agent(cfg.auth.agent_secret)
    for method, route, handler in agent.routes():
        server.routes.route(method, route)(agent.guarded(handler))
    def sweep() -> None:  # partial copies nobody resumed, hourly for as long as ComfyUI runs
        while True:
            try:
                agent.sweep()
            except OSError as e:
                log.warning("ComfyLB agent: partial copies not swept: %s", e)
            if stopped.wait(3600):
                return
    stopped = threading.Event()
    threading.Thread(target=sweep, name="comfylb-agent-sweep", daemon=True).start()
    log.info("ComfyLB: role peer: the agent serves this ComfyUI's model files to its coordinator "
             "(signed with auth.agent_secret); prompts are not balanced here")
    detached(server, "this ComfyUI is a peer (role: peer): ComfyLB only copies model files for its "
                     "coordinator here; manage the cluster on the coordinator", path)


_LEADERSHIP: list[Leadership] = []  # held for as long as this ComfyUI runs: the lock lives in its session


def _stop_leading(cluster: Cluster) -> None:
    """No two leaders: this one stops dispatching (ComfyUI itself runs on)."""
    log.error("ComfyLB: lost the database connection that makes this coordinator the leader; it stops "
              "dispatching (restart ComfyUI once the database is back)")
    asyncio.ensure_future(cluster.stop())


def _lead(cfg: Config) -> Leadership | None:
    """With storage.url: leading the cluster now, or standing by (lead.leading says which).
    Other coordinators reach this one at server.advertise_url, else at ComfyUI's own address."""
    if not cfg.storage.url:
        return None
    if cfg.server.advertise_url:
        me = cfg.server.advertised()
    else:
        from comfy.cli_args import args  # only inside ComfyUI

        listen = (args.listen or "127.0.0.1").split(",")[0].strip()
        me = ServerConfig(host=listen, port=int(args.port)).advertised()
    lead = Leadership(cfg.storage.url, me)
    lead.try_lead()
    _LEADERSHIP.append(lead)
    return lead


UPLOADS = ("/upload/image", "/upload/mask")  # ComfyUI's own routes: it stores them where the cluster reads


def _keeping_uploads(cluster: Cluster, store: InputStore) -> Any:
    """With a shared database, an upload ComfyUI stored is kept there too, so whichever
    coordinator leads next has it (Cluster.start fetches what it lacks)."""
    @web.middleware
    async def keep_uploads(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        path = unprefixed(request.path)
        if request.method != "POST" or path not in UPLOADS or response.status != 200 \
                or not isinstance(response, web.Response) or not isinstance(response.body, bytes):
            return response
        try:
            said = json.loads(response.body)
            key = (str(said.get("type") or "input"), str(said.get("subfolder") or ""), str(said["name"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return response
        f = await asyncio.to_thread(store.lookup, *key)  # hashes the file: not on the event loop
        if f is not None:
            try:
                await cluster.db.save_input(f.key, f.sha256, await asyncio.to_thread(store.path_of(f).read_bytes))
            except StoreError as e:
                return upload_not_kept(e)
        return response
    return keep_uploads


class StandBy:
    """While another coordinator leads, this ComfyUI passes the cluster's routes (its API,
    /ws, /lb/*) on to it; the web UI's files, settings and user data stay this ComfyUI's.
    `leading` turns true once this one has taken over and its cluster has started."""

    def __init__(self, lead: Leadership, table: list[tuple[str, re.Pattern, Intercept]], access: Access) -> None:
        self.forwarder = Forwarder(lead.leader, Edge(lead.leader, lead.edge_secret))
        self.table = table
        self.access = access
        self.leading = False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.leading:
            return await handler(request)
        path = unprefixed(request.path)
        if path == "/lb/ready":
            return await self.forwarder.ready(request)
        if path.startswith("/lb/"):
            # judged here as the leader would judge it: to the leader the request comes from
            # this machine, which would make "this machine only" everyone's
            refused = (None if path in ("/lb/state", "/lb/session") and self.access.origin_ok(request)
                       else self.access.lb_refusal(request))
        elif path == "/ws" or path in UPLOADS or match(self.table, request.method, request.path) is not None:
            refused = None if self.access.origin_ok(request, api=True) else cross_site_refusal(request.path)
        else:
            return await handler(request)  # this ComfyUI's own: its web UI, settings, user data
        request["comfylb_forwarded"] = True  # the leader's answer: it keeps the leader's instance id
        return refused or await self.forwarder.forward(request)


def detached(server: Any, reason: str, path: str) -> None:
    """Not attached: only GET /lb/state answers, so the sidebar tab can say why and where to
    fix it.  A client from elsewhere, while ComfyUI listens beyond localhost, is told less."""
    exposed = listens_beyond_loopback(_comfy_args()[0])

    async def state(request: web.Request) -> web.Response:
        if exposed and not is_loopback_client(request):
            return web.json_response({"attached": False, "reason": "ComfyLB is not attached: see ComfyUI's log"})
        return web.json_response({"attached": False, "reason": reason, "config": path})

    server.routes.get("/lb/state")(state)  # ComfyUI adds the /api twin


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
        from comfy_api import feature_flags  # type: ignore[import-not-found]  # only inside ComfyUI
    except ImportError:
        return
    flags = getattr(feature_flags, "SERVER_FEATURE_FLAGS", None)
    if isinstance(flags, dict) and flags.get("assets"):
        flags["assets"] = False
        log.info("ComfyLB: the web UI lists outputs from the cluster's /api/jobs (assets flag off)")


def _compile(path: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")


async def _local_json(request: web.Request, original: Handler) -> Any:
    """This ComfyUI's own answer, or None (a route it lacks raises HTTPNotFound)."""
    try:
        resp = await original(request)
        body = resp.body if isinstance(resp, web.Response) and resp.content_type == "application/json" else None
        if resp.status != 200 or not isinstance(body, (bytes, bytearray)) or not body:
            return None  # a static file: not an API answer
        return json.loads(body)
    except (web.HTTPException, ValueError):
        return None


def _merged(local: Any, remote: list | None) -> list:
    """The items of this ComfyUI's list and the peers', each once."""
    return list({json.dumps(x, sort_keys=True): x for x in (local or []) + (remote or [])}.values())


class Overrides:
    """The extension's answers to the routes where this ComfyUI's own answer counts too (its
    files, its nodes, its devices, …): each intercept gets ComfyUI's handler as `original`.
    Every other route of the table the cluster answers alone."""

    def __init__(self, api: ComfyApi, cluster: Cluster, cfg: Config) -> None:
        self.api, self.cluster, self.cfg = api, cluster, cfg

    def table(self) -> dict[tuple[str, str], Intercept]:
        """(method, path as in ComfyApi.routes()) → intercept."""
        return {
            ("POST", "/interrupt"): self.interrupt,
            ("GET", "/view"): self.view,
            ("GET", "/object_info"): self.object_info,
            ("GET", "/object_info/{node_class}"): self.object_info_node,
            ("GET", "/embeddings"): self.union("/embeddings"),
            ("GET", "/models"): self.union("/models"),
            ("GET", "/models/{folder}"): self.models_folder,
            ("GET", "/system_stats"): self.system_stats,
            ("POST", "/free"): self.free,
            ("GET", "/node_replacements"): self.node_replacements,
        }

    async def view(self, request: web.Request, original: Handler) -> web.StreamResponse:
        resp = await self.api.serve_view(request)
        if resp is not None:
            return resp
        resp = await original(request)  # a file of this ComfyUI's own
        if resp.status == 200 and not resp.prepared:
            # ComfyUI 0.3.75 shows an SVG (and XML, XSL) inline: a script in it would run as this origin
            name = os.path.basename(split_annotation(request.rel_url.query.get("filename", ""))[0])
            resp.headers.update(served_file_headers(resp.headers.get("Content-Type") or mimetypes.guess_type(name)[0],
                                                    name, resp.headers.get("Content-Disposition")))
        return resp

    async def interrupt(self, request: web.Request, original: Handler) -> web.StreamResponse:
        try:
            data = jsonsafe.loads(await request.read() or b"{}")
        except ValueError:
            data = {}
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        if pid is not None and str(pid) not in self.cluster.tasks:
            return await original(request)  # not ours: ComfyUI's own prompt
        if not await self.cluster.control.interrupt(str(pid) if pid is not None else None) and pid is None:
            return await original(request)  # nothing of ours runs: whatever this ComfyUI runs
        return web.Response(status=200)

    async def object_info(self, request: web.Request, original: Handler) -> web.StreamResponse:
        local = await _local_json(request, original) or {}
        return web.json_response({**local, **await self.api.catalog()})

    async def object_info_node(self, request: web.Request, original: Handler) -> web.StreamResponse:
        peers = await self.api.catalog()
        cls = request["comfylb_params"]["node_class"]
        if cls in peers:
            return web.json_response({cls: peers[cls]})
        return await original(request)

    def union(self, path: str) -> Intercept:
        async def intercept(request: web.Request, original: Handler) -> web.StreamResponse:
            return web.json_response(_merged(await _local_json(request, original), await self.api.union_of(path)))
        return intercept

    async def models_folder(self, request: web.Request, original: Handler) -> web.StreamResponse:
        folder = request["comfylb_params"]["folder"]
        local = await _local_json(request, original)
        remote = await self.api.union_of(f"/models/{folder}") if folder in await self.api.union_of("/models") else None
        if local is None and remote is None:
            return web.Response(status=404)
        return web.json_response(_merged(local, remote))

    async def node_replacements(self, request: web.Request, original: Handler) -> web.StreamResponse:
        local = replacements.parse(await _local_json(request, original))
        await self.api.catalog()
        return web.json_response(replacements.merge([local, self.cluster.catalog.swaps()]))

    async def free(self, request: web.Request, original: Handler) -> web.StreamResponse:
        await self.api.free(request)  # the peers free theirs; this ComfyUI its own
        return await original(request)

    async def system_stats(self, request: web.Request, original: Handler) -> web.StreamResponse:
        local = await _local_json(request, original) or {}
        devices = [dict(d, peer=LOCAL) for d in local.get("devices", [])] if self.cfg.local.enabled else []
        for p in self.cluster.peers.values():
            if p.name != LOCAL and p.system_stats and not p.removed:
                devices += [dict(d, peer=p.name) for d in p.system_stats.get("devices", [])]
        return web.json_response({"system": local.get("system", {}), "devices": devices})


def _cluster_only(handler: Handler) -> Intercept:
    """The cluster answers; the coordinator's own handler is not asked."""
    async def intercept(request: web.Request, original: Handler) -> web.StreamResponse:
        return await handler(request)
    return intercept


def intercepts(routes: list[Route], overrides: dict[tuple[str, str], Intercept]
               ) -> list[tuple[str, re.Pattern, Intercept]]:
    """The routes this host serves, as the middleware matches them: against the request's
    path with one `/api` taken off (ComfyUI's `/x` and `/api/x` alike), so a route ComfyUI
    declares as `/api/x` is matched as `/x` (its /api/x) and as `/api/x` (its /api/api/x)."""
    served = [r for r in routes if r.serves(EXTENSION)]
    unknown = overrides.keys() - {(r.method, r.path) for r in served}
    if unknown:
        raise ValueError(f"overrides for routes the extension does not serve: {sorted(unknown)}")
    table = []
    for r in served:
        intercept = overrides.get((r.method, r.path)) or _cluster_only(r.handler)
        for path in ([r.path[4:], r.path] if r.path.startswith("/api/") else [r.path]):
            table.append((r.method, _compile(path), intercept))
    return table


def match(table: list[tuple[str, re.Pattern, Intercept]], method: str, path: str
          ) -> tuple[Intercept, dict[str, str]] | None:
    """The intercept answering a request, with its path parameters; None: ComfyUI's own."""
    path = unprefixed(path)
    for m, pattern, intercept in table:
        if m == method:
            found = pattern.match(path)
            if found is not None:
                return intercept, found.groupdict()
    return None


def _middleware(table: list[tuple[str, re.Pattern, Intercept]], access: Access, secret: str) -> Any:
    @web.middleware
    async def comfylb_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get(BYPASS) == secret:
            return await handler(request)
        found = match(table, request.method, request.path)
        if found is None:
            return await handler(request)
        if not access.origin_ok(request, api=True):
            return cross_site_refusal(request.path)  # a page elsewhere must not queue on (or stop) the peers
        intercept, request["comfylb_params"] = found
        return await intercept(request, handler)
    return comfylb_middleware


def _workers(cfg: Config) -> Workers:
    """Workers run this very ComfyUI (its folder, its Python, its models and custom nodes)
    unless the config names another; `auto` leaves out the GPU the coordinator renders on."""
    import folder_paths  # only inside ComfyUI: its module sits in ComfyUI's folder, beside main.py
    from comfy.cli_args import args

    w = cfg.workers
    comfyui = w.comfyui or os.path.dirname(os.path.abspath(folder_paths.__file__))
    inherited = ["--base-directory", args.base_directory] if getattr(args, "base_directory", None) else []
    for paths in getattr(args, "extra_model_paths_config", None) or []:
        for one in paths if isinstance(paths, list) else [paths]:
            inherited += ["--extra-model-paths-config", os.path.abspath(one)]
    environ = dict(os.environ)
    cuda_device = getattr(args, "cuda_device", None)
    if cuda_device is not None:
        environ.pop("CUDA_VISIBLE_DEVICES", None)  # ComfyUI set it to its own device: every GPU counts
    taken = None
    if cfg.local.enabled and not w.gpus:
        visible = detect_gpus(environ) if cuda_device is None else [str(cuda_device)]
        taken = visible[0] if visible else None
    install = Install(comfyui, w.python or sys.executable, inherited, knows_flag(comfyui, "--database-url"))
    return resolve(w, install, cfg.storage.dir, taken, environ)


def _run_with_comfyui(server: Any, cfg: Config, cluster: Cluster, workers: Workers, lead: Leadership | None,
                      standby: StandBy | None) -> None:
    """Started and stopped with ComfyUI's server; a stand-by starts once it leads."""
    async def lead_now() -> None:
        if lead is not None:
            lead.watch(lambda: server.loop.call_soon_threadsafe(_stop_leading, cluster))
        await cluster.start()
        await workers.start(cluster, cfg.workers)

    async def take_over(standby: StandBy) -> None:
        assert lead is not None
        await standby.forwarder.start()
        lead.listen()
        log.info("ComfyLB: standing by: another coordinator leads the cluster in %s; this ComfyUI passes "
                 "prompts and its clients on to it, and takes over if it goes", lead.shown)
        await lead.wait_to_lead()
        try:
            await lead_now()
        except Exception:  # noqa: BLE001 - whatever failed, holding the lock would stop the whole cluster
            log.exception("ComfyLB: taking over the cluster failed; this ComfyUI lets go of it so that another "
                          "coordinator can lead (restart ComfyUI to stand by again)")
            lead.close()
            return
        standby.leading = True
        await standby.forwarder.close()  # its clients reconnect: to this ComfyUI, which leads now

    waiting: list[asyncio.Task] = []

    async def start(app: web.Application) -> None:
        if standby is None:
            await lead_now()
        else:
            waiting.append(asyncio.ensure_future(take_over(standby)))

    async def stop(app: web.Application) -> None:
        for t in waiting:
            t.cancel()
        if lead is not None:
            lead.close()  # a wait for the lock ends
        if standby is not None and not standby.leading:
            await standby.forwarder.close()
        await workers.stop()
        await cluster.stop()

    server.app.on_startup.append(start)
    server.app.on_cleanup.append(stop)


def attach(server: Any, cfg: Config, lead: Leadership | None = None) -> Cluster:
    import folder_paths  # only inside ComfyUI

    secret = uuid.uuid4().hex
    if cfg.local.enabled:
        host, port = _local_address()
        cfg.backends.append(BackendConfig(name=LOCAL, host=host, port=port, weight=cfg.local.weight,
                                          max_queue=cfg.local.max_queue, headers={BYPASS: secret}))
    store = InputStore({"input": folder_paths.get_input_directory(),
                        "output": folder_paths.get_output_directory(),
                        "temp": folder_paths.get_temp_directory()})
    cluster = Cluster(cfg, PromptServerHub(server), store, open_store(cfg))
    cluster.outputs.own = LOCAL if cfg.local.enabled else None
    api = ComfyApi(cluster, store, own_files=True, on_prompt=server.trigger_on_prompt)
    # The jobs API is answered whether or not this ComfyUI has its own.
    table = intercepts(api.routes(), Overrides(api, cluster, cfg).table())
    # ComfyUI's --listen decides who can reach /lb/*: beyond localhost, a token or this machine only
    listen, cors = _comfy_args()
    access = Access.of(cfg, loopback_only=listens_beyond_loopback(listen) and not cfg.auth.allow_open,
                       api_origins=frozenset({cors.strip().lower().rstrip("/")}) if cors else frozenset(),
                       cookie_paths=("/lb", "/api/lb"))
    log.info("ComfyLB: %s", access.describe(api=False))
    standby = StandBy(lead, table, access) if lead is not None and not lead.leading else None
    if standby is not None:
        server.app.middlewares.append(standby.middleware)  # before ComfyLB's own: the leader answers instead
    server.app.middlewares.append(_middleware(table, access, secret))
    if lead is not None:
        server.app.middlewares.append(_keeping_uploads(cluster, store))

    async def sign(request: web.Request, response: web.StreamResponse) -> None:
        if request.headers.get(BYPASS) != secret and not request.get("comfylb_forwarded"):
            # the `local` peer is this ComfyUI on purpose; a stand-by's answers are the leader's
            response.headers[INSTANCE_HEADER] = cluster.instance_id  # a configured peer that is us is refused
    server.app.on_response_prepare.append(sign)
    workers = _workers(cfg)
    for method, path, handler in LbApi(cluster, access, workers).routes():
        server.routes.route(method, path)(handler)  # ComfyUI adds the /api twin
    async def ready(request: web.Request) -> web.Response:  # for orchestrators (a stand-by answers itself)
        return web.json_response({"ready": True, "role": "leader" if lead is not None else "alone"})
    server.routes.get("/lb/ready")(ready)
    server.get_queue_info = lambda: {"exec_info": {"queue_remaining": cluster.ledger.remaining()}}
    _no_local_assets()

    _run_with_comfyui(server, cfg, cluster, workers, lead, standby)
    names = [b.name for b in cfg.backends if b.enabled]
    log.info("ComfyLB: prompts sent to this ComfyUI run on %d peer(s): %s%s", len(names), ", ".join(names),
             "" if cfg.local.enabled else " (not on this machine: local.enabled is false)")
    return cluster
