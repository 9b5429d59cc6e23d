"""The `/lb/*` management API: JSON in and out, 4xx errors that say what was wrong."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..access import Access, cross_site_refusal, matches, session_cookies, session_value
from .. import inventory, jsonsafe
from ..config import ConfigError, parse_backend
from ..dispatcher import ITSELF, SCHEDULER_CHOICES, STATUS_EVENT, Cluster
from ..peer import Peer
from ..tasks import State
from ..transfers import CopyRefused
from ..workers import LOG_LINES, MAX_LOG_LINES, Worker, Workers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TASK_STATES = State.names()


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def read_object(request: web.Request, shape: str) -> dict | web.Response:
    """The request's body as a JSON object, or the 400 that says why not."""
    try:
        raw = jsonsafe.loads(await request.read() or b"null", max_bytes=jsonsafe.MAX_BODY_BYTES)
    except ValueError as e:  # jsonsafe.JSONError too: deep, huge, NaN
        return error(400, f"body is not valid JSON: {str(e)[:200]}")
    return raw if isinstance(raw, dict) else error(400, f"expected a JSON object: {shape}")


class LbApi:
    def __init__(self, cluster: Cluster, access: Access | None = None, workers: Workers | None = None) -> None:
        self.cluster = cluster
        self.access = access or Access()
        self.workers = workers or Workers([])

    def routes(self) -> list[tuple[str, str, Handler]]:
        checked = [  # anyone may ask these; the Origin and Content-Type rules still apply
            ("GET", "/lb/state", self.state),
            ("POST", "/lb/session", self.login),
            ("DELETE", "/lb/session", self.logout),
        ]
        guarded = [
            ("POST", "/lb/subscribe", self.subscribe),
            ("GET", "/lb/status", self.status),
            ("GET", "/lb/metrics", self.metrics),
            ("GET", "/lb/stats", self.stats),
            ("GET", "/lb/backends", self.backends),
            ("POST", "/lb/backends", self.add_backend),
            ("GET", "/lb/backends/{name}", self.backend),
            ("GET", "/lb/backends/{name}/inventory", self.backend_inventory),
            ("GET", "/lb/inventory", self.inventories),
            ("DELETE", "/lb/backends/{name}", self.remove_backend),
            ("POST", "/lb/backends/{name}/enable", self.enable),
            ("POST", "/lb/backends/{name}/disable", self.disable),
            ("GET", "/lb/backends/{name}/log", self.worker_log),
            ("POST", "/lb/backends/{name}/restart", self.restart_worker),
            ("POST", "/lb/backends/{name}/models", self.copy_model),
            ("GET", "/lb/transfers", self.transfers),
            ("GET", "/lb/tasks", self.tasks),
            ("GET", "/lb/tasks/{task_id}", self.task),
            ("DELETE", "/lb/tasks/{task_id}", self.cancel_task),
            ("POST", "/lb/health-check", self.health_check),
            ("GET", "/lb/scheduler", self.scheduler),
            ("POST", "/lb/scheduler/strategy/{value}", self.scheduler_setter("strategy", "strategies")),
            ("POST", "/lb/scheduler/order/{value}", self.scheduler_setter("order", "orders")),
        ]
        return [(m, p, self._check(h, False)) for m, p, h in checked] + \
               [(m, p, self._check(h, True)) for m, p, h in guarded] + \
               [("GET", "/lb/edge", self.cluster.edges.handle)]  # signed with the cluster's secret instead

    def _check(self, handler: Handler, guarded: bool) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if guarded:
                refused = self.access.lb_refusal(request)
            elif not self.access.origin_ok(request):
                refused = cross_site_refusal(request.path)
            else:
                refused = None
            if refused is None and request.body_exists and not _is_json(request.content_type):
                # a browser sends a body to another site without asking first only as a form
                # or text/plain: JSON endpoints take JSON, said so
                refused = error(415, "send the body as JSON (Content-Type: application/json), "
                                     f"not {request.content_type}")
            return refused or await handler(request)
        return checked

    # -- the panel's session and live state -------------------------------------------------
    async def state(self, request: web.Request) -> web.Response:
        """Whether ComfyLB runs here (the extension answers this when not attached, too),
        whether a token guards /lb/*, and whether this browser's session cookie is good."""
        return web.json_response({"attached": True, "guarded": bool(self.access.lb_token),
                                  "session": self.access.has_session(request)})

    async def login(self, request: web.Request) -> web.Response:
        """POST /lb/session {"token"}: an HttpOnly cookie the /lb guard accepts, so the
        panel keeps no token where a script could read it."""
        data = await read_object(request, '{"token": "<the /lb token>"}')
        if isinstance(data, web.Response):
            return data
        token = data.get("token")
        if not isinstance(token, str) or not token:
            return error(400, 'expected {"token": "<the /lb token>"}')
        if not self.access.lb_token:
            return error(409, "no token guards /lb/* here (auth.token): there is nothing to log in to")
        if not matches(token, self.access.lb_token):
            return error(401, "wrong token")
        return self._with_cookies(web.json_response({"session": True}), session_value(self.access.lb_token), request)

    async def logout(self, request: web.Request) -> web.Response:
        return self._with_cookies(web.json_response({"session": False}), "", request)

    def _with_cookies(self, resp: web.Response, value: str, request: web.Request) -> web.Response:
        for cookie in session_cookies(value, self.access.cookie_paths, request.secure):
            resp.headers.add("Set-Cookie", cookie)
        return resp

    async def subscribe(self, request: web.Request) -> web.Response:
        """POST /lb/subscribe {"client_id"}: that client's open websocket receives the
        comfylb.status pushes (no other socket does), starting with the state now."""
        data = await read_object(request, '{"client_id": "<the clientId of an open /ws>"}')
        if isinstance(data, web.Response):
            return data
        sid = data.get("client_id")
        if not isinstance(sid, str) or not 0 < len(sid) <= 256:
            return error(400, 'expected {"client_id": "<the clientId of an open /ws>"}')
        hub = self.cluster.hub
        if not hub.watch(sid):
            return error(404, f"no websocket is open with client_id {sid!r}")
        await hub.send_json(STATUS_EVENT, self.cluster.snapshot(), sid)
        return web.json_response({"subscribed": sid})

    # -- reading -------------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        """The same snapshot the comfylb.status event pushes: a panel's first paint."""
        return web.json_response(self.cluster.snapshot())

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.cluster.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.cluster.stats())

    async def backends(self, request: web.Request) -> web.Response:
        return web.json_response({"backends": [p.describe() for p in self.cluster.peers.values()]})

    def _peer(self, request: web.Request) -> Peer | web.Response:
        """The peer named in the path, or the 404 to answer."""
        name = request.match_info["name"]
        peer = self.cluster.peers.get(name)
        if peer is None or peer.removed:
            return error(404, f"no backend named {name!r}")
        return peer

    async def backend(self, request: web.Request) -> web.Response:
        peer = self._peer(request)
        return peer if isinstance(peer, web.Response) else web.json_response(peer.describe())

    async def _inventory(self, peer: Peer) -> inventory.Inventory:
        return inventory.inventory(peer.object_info, await self.cluster.catalog.model_listings(peer))

    async def backend_inventory(self, request: web.Request) -> web.Response:
        """A peer's model files per folder, node types and custom node packs."""
        peer = self._peer(request)
        if isinstance(peer, web.Response):
            return peer
        return web.json_response({"name": peer.name, **await self._inventory(peer)})

    async def inventories(self, request: web.Request) -> web.Response:
        """For each peer, what it lacks that another peer has; custom node packs it lacks
        come with how to install them (ComfyUI-Manager: ComfyLB installs no code on peers)."""
        peers = [p for p in self.cluster.peers.values() if not p.removed]
        found = await asyncio.gather(*(self._inventory(p) for p in peers))
        lacking = inventory.lacks({p.name: inv for p, inv in zip(peers, found)})
        return web.json_response({"backends": {
            name: {**entry, "packs_hint": inventory.packs_hint(name, entry["lacks"]["packs"])}
            for name, entry in lacking.items()}})

    async def tasks(self, request: web.Request) -> web.Response:
        q = request.rel_url.query
        state = q.get("state")
        if state is not None and state not in TASK_STATES:
            return error(400, f"unknown state {state!r}", states=list(TASK_STATES))
        try:
            limit = int(q.get("limit", 100))
            offset = int(q.get("offset", 0))
        except ValueError:
            return error(400, "limit and offset must be integers")
        if not 1 <= limit <= 1000 or offset < 0:
            return error(400, "limit must be 1-1000 and offset at least 0")
        tasks = [t for t in reversed(self.cluster.record.values()) if state is None or t.state == state]
        return web.json_response({"total": len(tasks), "offset": offset, "limit": limit,
                                  "tasks": [t.summary() for t in tasks[offset:offset + limit]]})

    async def task(self, request: web.Request) -> web.Response:
        task = self.cluster.record.get(request.match_info["task_id"])
        if task is None:
            return error(404, f"no task {request.match_info['task_id']!r}")
        prompt = task.prompt
        if prompt is None:  # an ended task keeps no prompt; its history entry does, while it is kept
            item = (self.cluster.history.get(task.prompt_id) or {}).get("prompt") or []
            prompt = item[2] if len(item) > 2 else None
        return web.json_response(task.summary() | {"outputs_to_execute": task.outputs,
                                                   "prompt": prompt, "extra_data": task.public_extra_data()})

    async def scheduler(self, request: web.Request) -> web.Response:
        return web.json_response(self.cluster.scheduler_info())

    # -- changing --------------------------------------------------------------------------
    async def add_backend(self, request: web.Request) -> web.Response:
        raw = await read_object(request, "{name, host, port, weight?, max_queue?, enabled?}")
        if isinstance(raw, web.Response):
            return raw
        try:
            b = parse_backend(raw, "backend")
        except ConfigError as e:
            return error(400, str(e), field=e.field)
        existing = self.cluster.peers.get(b.name)
        if existing is not None and not existing.removed:
            return error(409, f"a backend named {b.name!r} already exists")
        if existing is not None:
            return error(409, f"backend {b.name!r} is still finishing its prompts after removal; try again later")
        peer = self.cluster.add_peer(b, persist=True)
        await self.cluster.check_peer(peer)
        if peer.answered_by == self.cluster.instance_id:
            await self.cluster.remove_peer(b.name)
            return error(400, f"{b.url}: {ITSELF}", field="port")
        return web.json_response(peer.describe(), status=201)

    async def remove_backend(self, request: web.Request) -> web.Response:
        peer = self._peer(request)
        if isinstance(peer, web.Response):
            return peer
        if self.workers.get(peer.name) is not None:
            return error(409, f"{peer.name!r} is a local worker: change workers.count in the config to have fewer "
                              "(or disable it)")
        await self.cluster.remove_peer(peer.name)
        return web.json_response({"removed": peer.name, "finishing": len(peer.tasks)})

    async def enable(self, request: web.Request) -> web.Response:
        return await self._set_enabled(request, True)

    async def disable(self, request: web.Request) -> web.Response:
        return await self._set_enabled(request, False)

    async def _set_enabled(self, request: web.Request, enabled: bool) -> web.Response:
        peer = self._peer(request)
        if isinstance(peer, web.Response):
            return peer
        self.cluster.set_enabled(peer.name, enabled)
        return web.json_response(peer.describe())

    def _worker(self, request: web.Request) -> Worker | web.Response:
        """The local worker named in the path, or the 4xx to answer."""
        peer = self._peer(request)
        if isinstance(peer, web.Response):
            return peer
        worker = self.workers.get(peer.name)
        if worker is None:
            return error(400, f"backend {peer.name!r} is not a local worker (workers: in the config): "
                              "ComfyLB did not start it, so has no log of it and cannot restart it")
        return worker

    async def worker_log(self, request: web.Request) -> web.Response:
        """GET /lb/backends/{name}/log?lines=N: the last lines of a local worker's output."""
        worker = self._worker(request)
        if isinstance(worker, web.Response):
            return worker
        raw = request.rel_url.query.get("lines", str(LOG_LINES))
        # isdecimal, not isdigit: "²" is a digit int() refuses; and int() refuses 4,300 digits
        n = int(raw) if raw.isdecimal() and len(raw) <= 16 else 0
        if not 1 <= n <= MAX_LOG_LINES:
            return error(400, f"lines must be a whole number from 1 to {MAX_LOG_LINES}, got {raw[:20]!r}")
        lines = await asyncio.to_thread(worker.read_log, n)
        return web.json_response({"name": worker.name, **worker.describe(), "lines": lines})

    async def restart_worker(self, request: web.Request) -> web.Response:
        """POST /lb/backends/{name}/restart: the worker is stopped and started again at once."""
        worker = self._worker(request)
        if isinstance(worker, web.Response):
            return worker
        if worker.state == "stopped":
            return error(409, f"{worker.name!r} is stopped: the coordinator is shutting down")
        await worker.restart()
        return web.json_response({"name": worker.name, **worker.describe()}, status=202)

    async def copy_model(self, request: web.Request) -> web.Response:
        """POST /lb/backends/{name}/models {folder, name, from, sha256?}: copy a model file to
        this peer from another peer (`from` its name) or an http(s) URL; 202 with the copy,
        whose progress GET /lb/transfers and the status push tell."""
        dest = self._peer(request)
        if isinstance(dest, web.Response):
            return dest
        raw = await read_object(request, "{folder, name, from, sha256?}")
        if isinstance(raw, web.Response):
            return raw
        unknown = set(raw) - {"folder", "name", "from", "sha256"}
        if unknown:
            return error(400, f"unknown field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
        try:
            copy, new = await self.cluster.transfers.start(dest, raw.get("folder"), raw.get("name"), raw.get("from"),
                                                           raw.get("sha256"))
        except CopyRefused as e:
            return error(e.status, str(e))
        return web.json_response(copy.describe(), status=202 if new else 200)

    async def transfers(self, request: web.Request) -> web.Response:
        return web.json_response({"transfers": self.cluster.transfers.describe()})

    async def cancel_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        task = self.cluster.record.get(task_id)
        if task is None:
            return error(404, f"no task {task_id!r}")
        if not await self.cluster.control.cancel(task_id):
            return error(409, f"task {task_id!r} has already ended ({task.state})", task=task.summary())
        return web.json_response(task.summary(), status=202)

    async def health_check(self, request: web.Request) -> web.Response:
        await self.cluster.health.check_all()
        return web.json_response({"backends": [
            {"name": p.name, "state": p.health.state, "linked": p.linked, "available": p.available,
             "last_error": p.health.last_error, "checked_at": p.health.checked_at}
            for p in self.cluster.peers.values()]})

    def scheduler_setter(self, key: str, plural: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            value, choices = request.match_info["value"], SCHEDULER_CHOICES[key].names()
            if value not in choices:
                return error(400, f"unknown {key} {value!r}", **{plural: list(choices)})
            self.cluster.set_scheduler(key, value)
            return web.json_response(self.cluster.scheduler_info())
        return handler
