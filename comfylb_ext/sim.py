"""A simulated ComfyUI peer, for fast unit tests, demos and benchmarks.

    python -m comfylb_ext.sim --port 8288 [--slowdown 2] [--model-load 1.5]

It speaks today's ComfyUI (server ~0.38: the jobs API, UUID prompt ids, node replacements)
over HTTP and websocket, with the message sequence recorded from real ComfyUI
(tests/data/transcript.md),
for a small set of model-free nodes, and renders no real images (solid-colour PNGs).  Like
ComfyUI, every route is also served under /api.  It never stands in for the real-peer tests.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import heapq
import itertools
import json
import logging
import os
import struct
import tempfile
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import WSMsgType, web

from . import jobs, replacements
from .uploads import TYPES, split_annotation
from .errors import error_body
from .validation import validate

log = logging.getLogger(__name__)

MAX_UPLOAD_SIZE = 104857600
# ComfyUI moves these out of extra_data into a sixth, never shown, queue-item element
# (execution.SENSITIVE_EXTRA_DATA_KEYS); the sim keeps them in extra_data, where tests
# can see they arrived, and leaves them out of everything it shows.
SENSITIVE = ("auth_token_comfy_org", "api_key_comfy_org")


def shown(item: list) -> list:
    """A queue item as /queue, /history and the jobs API show it."""
    return [*item[:3], {k: v for k, v in item[3].items() if k not in SENSITIVE}, *item[4:]]


def _err(typ: str, message: str, details: str = "") -> dict:
    return {"type": typ, "message": message, "details": details, "extra_info": {}}


def history_page(history: dict, max_items: int | None, offset: int) -> dict:
    """GET /history?max_items=&offset=: PromptQueue.get_history's paging, oldest first;
    max_items without an offset means the newest max_items."""
    if offset < 0 and max_items is not None:
        offset = len(history) - max_items
    out: dict = {}
    for i, (k, v) in enumerate(history.items()):
        if i >= offset:
            out[k] = v
            if max_items is not None and len(out) >= max_items:
                break
    return out


def save_path(prefix: str, output_dir: Path) -> tuple[str, str]:
    """(subfolder, file name prefix) as ComfyUI's folder_paths.get_save_image_path makes
    them, refusing, as it does, a prefix that leads outside the output folder."""
    norm = os.path.normpath(prefix)
    subfolder, filename = os.path.dirname(norm), os.path.basename(norm)
    base = os.path.abspath(output_dir)
    if os.path.commonpath((base, os.path.abspath(os.path.join(base, subfolder)))) != base:
        raise Exception("**** ERROR: Saving image outside the output folder is not allowed."
                        f"\n full_output_folder: {os.path.join(base, subfolder)}\n         output_dir: {base}")
    return subfolder, filename


def png(width: int, height: int, rgb: int) -> bytes:
    """A solid-colour RGB PNG."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    pixel = bytes(((rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255))
    raw = b"".join(b"\x00" + pixel * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _node(name: str, required: dict, output: list[str], category: str, output_node: bool = False,
          optional: dict | None = None) -> dict:
    inputs = {"required": required}
    if optional:
        inputs["optional"] = optional
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "output": output,
            "output_is_list": [False] * len(output), "output_name": output, "name": name,
            "display_name": name, "description": "", "python_module": "comfylb_ext.sim",
            "category": category, "output_node": output_node}


def catalog(inputs: list[str], checkpoints: list[str]) -> dict:
    INT = lambda d, mx=16384: ["INT", {"default": d, "min": 0, "max": mx}]  # noqa: E731
    return {
        "EmptyImage": _node("EmptyImage", {"width": INT(512), "height": INT(512), "batch_size": INT(1, 4096),
                                           "color": INT(0, 0xFFFFFF)}, ["IMAGE"], "image"),
        "ImageInvert": _node("ImageInvert", {"image": ["IMAGE", {}]}, ["IMAGE"], "image"),
        "ImageBlur": _node("ImageBlur", {"image": ["IMAGE", {}], "blur_radius": INT(1, 31),
                                         "sigma": ["FLOAT", {"default": 1.0}]}, ["IMAGE"], "image"),
        "ImageScale": _node("ImageScale", {"image": ["IMAGE", {}], "upscale_method": [["area", "bilinear"], {}],
                                           "width": INT(512), "height": INT(512),
                                           "crop": [["disabled", "center"], {}]}, ["IMAGE"], "image"),
        "TestSleep": _node("TestSleep", {"value": ["*", {}], "seconds": ["FLOAT", {"default": 2.0}]},
                           ["*"], "_for_testing"),
        "LoadImage": _node("LoadImage", {"image": [sorted(inputs), {"image_upload": True}]},
                           ["IMAGE", "MASK"], "image"),
        "SaveImage": _node("SaveImage", {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                           [], "image", output_node=True),
        "PreviewImage": _node("PreviewImage", {"images": ["IMAGE", {}]}, [], "image", output_node=True),
        "SaveImageWebsocket": _node("SaveImageWebsocket", {"images": ["IMAGE", {}]}, [], "api node/image",
                                    output_node=True),
        "CheckpointLoaderSimple": _node("CheckpointLoaderSimple", {"ckpt_name": [checkpoints, {}]},
                                        ["MODEL", "CLIP", "VAE"], "loaders"),
    }


class SimPeer:
    def __init__(self, root: Path, name: str = "sim", slowdown: float = 1.0, model_load: float = 0.0,
                 checkpoints: list[str] | None = None, token: str = "",
                 replacements: dict | None = None, asset_ids: bool = False) -> None:
        self.root, self.name = root, name
        self.token = token  # like a peer behind an auth proxy: every request needs it
        self.replacements = replacements or {}  # served at /node_replacements, applied by POST /prompt
        self.asset_ids = asset_ids  # like a peer with assets on: output items carry asset ids
        self.settings: dict[str, Any] = {}  # the single user's comfy.settings.json
        self.user_dir = False  # whether that user's folder exists yet (GET /users "migrated")
        self.free_flags: dict[str, Any] = {}  # POST /free, acted on between prompts
        self.slowdown, self.model_load = slowdown, model_load
        self.checkpoints = checkpoints or ["sim-a.safetensors", "sim-b.safetensors"]
        for t in TYPES:
            (root / t).mkdir(parents=True, exist_ok=True)
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.views: Counter[str] = Counter()  # files served by /view, by path
        self.state_changed = asyncio.Event()  # set, then replaced, whenever its queue changes
        self.flags: dict[str, dict] = {}
        self.queue: list = []
        self.counter = itertools.count()
        self.number = 0
        self.running: list | None = None
        self.history: dict[str, dict] = {}
        self.cache: dict[str, Any] = {}
        self.loaded_model: str | None = None
        self.model_loads = 0
        self.executed: list[str] = []  # prompt ids in the order they started
        self.interrupted = False
        self.wake = asyncio.Event()
        self.worker: asyncio.Task | None = None

    # -- messaging (ComfyUI's routing: status to all, the rest to the prompt's client) --
    async def send(self, event: str, data: Any, sid: str | None) -> None:
        text = json.dumps({"type": event, "data": data})
        targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            try:
                await ws.send_str(text)
            except (ConnectionError, RuntimeError):
                pass

    async def send_preview(self, image: bytes, prompt_id: str, node: str, sid: str | None) -> None:
        targets = [sid] if sid is not None else list(self.sockets)
        for s in targets:
            ws = self.sockets.get(s)
            if ws is None:
                continue
            if self.flags.get(s, {}).get("supports_preview_metadata"):
                meta = json.dumps({"node_id": node, "prompt_id": prompt_id, "display_node_id": node,
                                   "parent_node_id": None, "real_node_id": node,
                                   "image_type": "image/png"}).encode()
                frame = struct.pack(">II", 4, len(meta)) + meta + image
            else:
                frame = struct.pack(">II", 1, 2) + image
            try:
                await ws.send_bytes(frame)
            except (ConnectionError, RuntimeError):
                pass

    def remaining(self) -> int:
        return len(self.queue) + (1 if self.running else 0)

    async def status(self) -> None:
        """Its queue changed: tell the clients, as ComfyUI does (and whoever waits on it)."""
        self.state_changed.set()
        self.state_changed = asyncio.Event()
        await self.send("status", {"status": {"exec_info": {"queue_remaining": self.remaining()}}}, None)

    # -- execution -----------------------------------------------------------------------
    def feature_flags(self) -> dict:
        """comfy_api.feature_flags.get_server_features() of today's ComfyUI."""
        return {"supports_preview_metadata": True, "supports_model_type_tags": True,
                "max_upload_size": MAX_UPLOAD_SIZE, "extension": {"manager": {"supports_v4": True}},
                "node_replacements": True, "assets": self.asset_ids}

    async def run_worker(self) -> None:
        while True:
            if self.queue:
                item = heapq.heappop(self.queue)[2]
                self.running = item
                await self.status()
                try:
                    await self.execute(item)
                finally:
                    self.running = None
            else:
                self.wake.clear()
                await self.wake.wait()
            # ComfyUI's prompt_worker reads the /free flags after each prompt, or at once when idle
            flags, self.free_flags = self.free_flags, {}
            if flags.get("unload_models", flags.get("free_memory", False)):
                self.loaded_model = None
            if flags.get("free_memory"):
                self.cache = {}
            if flags:
                self.state_changed.set()
                self.state_changed = asyncio.Event()

    def execution_order(self, prompt: dict, outputs: list[str]) -> list[str]:
        seen: list[str] = []

        def visit(nid: str) -> None:
            if nid in seen:
                return
            for v in prompt[nid].get("inputs", {}).values():
                if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt:
                    visit(str(v[0]))
            seen.append(nid)
        for o in outputs:
            visit(o)
        return seen

    async def execute(self, item: list) -> None:
        pid = item[1]
        self.interrupted = False
        self.executed.append(pid)
        run = _Run(self, item)
        await run.add("execution_start", {"prompt_id": pid, "timestamp": _ms()})
        await run.add("execution_cached", {"nodes": run.cached, "prompt_id": pid, "timestamp": _ms()})
        await run.replay_cached()
        status_str = "success"
        for nid in run.order:
            if nid not in run.cached and not await run.node(nid):
                status_str = "error"
                break
        # Like ComfyUI's default (classic) cache: what the last prompt did not use is dropped.
        self.cache = {k: v for k, v in self.cache.items() if k in set(run.keys.values())}
        if status_str == "success":
            await run.add("execution_success", {"prompt_id": pid, "timestamp": _ms()})
        # As ComfyUI's task_done: out of the running list and into history at once, then the
        # status broadcast (queue_remaining no longer counts it), then executing null.
        self.history[pid] = {
            "prompt": shown(item),
            "outputs": run.ui,
            "status": {"status_str": status_str, "completed": status_str == "success", "messages": run.messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in run.ui},
        }
        self.running = None
        await self.status()
        if run.sid is not None:
            await self.send("executing", {"node": None, "prompt_id": pid}, run.sid)

    async def _sleep(self, seconds: float, pid: str, nid: str, sid: str | None, state: dict) -> None:
        seconds *= self.slowdown
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if self.interrupted:
                raise InterruptedError
            if left <= 0:
                return
            done = 1.0 - left / seconds
            await self.send("progress", {"value": done, "max": 1.0, "prompt_id": pid, "node": nid}, sid)
            state[nid].update(value=done)
            await asyncio.sleep(min(left, 0.05))

    async def run_node(self, nid: str, node: dict, pid: str, sid: str | None, state: dict) -> dict | None:
        cls, inputs = node["class_type"], node.get("inputs", {})
        if cls == "TestSleep":
            await self._sleep(float(inputs.get("seconds", 0)), pid, nid, sid, state)
        elif cls == "CheckpointLoaderSimple":
            if self.loaded_model != inputs.get("ckpt_name"):
                self.model_loads += 1
                self.loaded_model = inputs.get("ckpt_name")
                await self._sleep(self.model_load, pid, nid, sid, state)
        elif cls in ("SaveImage", "PreviewImage"):
            typ = "output" if cls == "SaveImage" else "temp"
            prefix = str(inputs.get("filename_prefix", "ComfyUI")) if typ == "output" else "ComfyUI_temp_sim"
            sub, base = save_path(prefix, self.root / typ)
            folder = self.root / typ / sub
            folder.mkdir(parents=True, exist_ok=True)
            n = 1 + max([int(p.stem.split("_")[-2]) for p in folder.glob(f"{base}_*_.png")
                         if p.stem.split("_")[-2].isdigit()] or [0])
            name = f"{base}_{n:05d}_.png"
            (folder / name).write_bytes(png(8, 8, (hash(pid) & 0xFFFFFF)))
            image = {"filename": name, "subfolder": sub, "type": typ}
            if self.asset_ids:  # asset_enrichment: an image is its own preview
                image["id"] = image["preview_id"] = str(uuid.uuid4())
            return {"images": [image]}
        elif cls == "SaveImageWebsocket":
            for i in range(2):
                await self.send("progress", {"value": i, "max": 2, "prompt_id": pid, "node": nid}, sid)
                await self.send_preview(png(8, 8, 0x0000FF), pid, nid, sid)
        return None

    # -- HTTP --------------------------------------------------------------------------------
    def object_info(self) -> dict:
        inputs = [p.relative_to(self.root / "input").as_posix() for p in (self.root / "input").rglob("*") if p.is_file()]
        return catalog(inputs, self.checkpoints)

    def has_file(self, name: str) -> bool:
        """LoadImage's VALIDATE_INPUTS (folder_paths.exists_annotated_filepath)."""
        name, typ = split_annotation(name)
        base = (self.root / (typ or "input")).resolve()
        try:
            path = (base / name).resolve()
            return path.is_relative_to(base) and path.exists()
        except (OSError, ValueError):
            return False

    async def submit(self, data: Any, usage_source: str | None) -> tuple[int, dict]:
        """POST /prompt, in today's ComfyUI's order: number, prompt, id rule, node
        replacement, validation, then the queue's duplicate check."""
        if not isinstance(data, dict):
            return 400, error_body(_err("invalid_prompt", "Request body must be a JSON object.", type(data).__name__))
        number: float
        if data.get("number") is None:
            number = -self.number if data.get("front") else self.number
            self.number += 1
        else:
            number = float(data["number"])
        if "prompt" not in data:
            return 400, error_body(_err("no_prompt", "No prompt provided", "No prompt provided"))
        pid = data.get("prompt_id")
        if pid is None:
            pid = str(uuid.uuid4())
        elif not jobs.is_canonical_uuid(pid):
            return 400, error_body(_err(
                "invalid_prompt_id", "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                "omit it to let the server generate one"))
        info = self.object_info()
        prompt = data["prompt"]
        if self.replacements:
            prompt = replacements.apply(prompt, replacements.parse(self.replacements), info)
        ok, error, outputs, node_errors = validate(prompt, info, data.get("partial_execution_targets"),
                                                   known_files=self.has_file, link_types=True)
        if not ok:
            return 400, error_body(error or {}, node_errors)
        if pid in self.active_ids():  # execution.DuplicatePromptIdError; a finished id may come again
            return 409, error_body(_err("duplicate_prompt_id",
                                        "A prompt with this prompt_id is already pending or running.", pid))
        extra = dict(data.get("extra_data") or {})
        if "client_id" in data:
            extra["client_id"] = data["client_id"]
        if usage_source and "comfy_usage_source" not in extra:
            extra["comfy_usage_source"] = usage_source
        extra["create_time"] = int(time.time() * 1000)
        heapq.heappush(self.queue, (number, next(self.counter), [number, pid, prompt, extra, outputs]))
        self.wake.set()
        await self.status()
        return 200, {"prompt_id": pid, "number": number, "node_errors": node_errors}

    def active_ids(self) -> set[str]:
        return {e[2][1] for e in self.queue} | ({self.running[1]} if self.running else set())

    def job(self, job_id: str) -> dict | None:
        """GET /api/jobs/{id}: history first, then running, then pending."""
        if job_id in self.history:
            return jobs.history_job(job_id, self.history[job_id], detail=True)
        if self.running and self.running[1] == job_id:
            return jobs.queue_detail(shown(self.running), "in_progress")
        item = next((e[2] for e in self.queue if e[2][1] == job_id), None)
        return jobs.queue_detail(shown(item), "pending") if item else None

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job in any state: running → interrupted, pending → dequeued (no events
        but the status broadcast), finished or unknown → nothing."""
        if self.running and self.running[1] == job_id:
            self.interrupted = True
            return True
        kept = [e for e in self.queue if e[2][1] != job_id]
        if len(kept) == len(self.queue):
            return False
        self.queue = kept
        heapq.heapify(self.queue)
        await self.status()
        return True

    def app(self) -> web.Application:
        h = _Handlers(self)
        defs = [web.RouteDef(method, path, handler, {}) for method, path, handler in h.routes()]
        app = web.Application(client_max_size=MAX_UPLOAD_SIZE, middlewares=[h.auth_proxy] if self.token else [])
        # as ComfyUI's add_routes: every route under /api too, then bare
        app.add_routes([web.RouteDef(d.method, "/api" + d.path, d.handler, d.kwargs) for d in defs])
        app.add_routes(defs)
        app.on_startup.append(h.start_worker)
        app.on_shutdown.append(h.stop_worker)
        return app


def _ms() -> int:
    return int(time.time() * 1000)


class _Run:
    """One prompt in SimPeer.execute: whom to tell, and what its history entry gathers."""

    def __init__(self, sim: SimPeer, item: list) -> None:
        _, self.pid, self.prompt, extra, self.outputs = item
        self.sim, self.sid = sim, extra.get("client_id")
        self.order = sim.execution_order(self.prompt, self.outputs)
        self.keys: dict[str, str] = {}
        for nid in self.order:  # upstream first, so a node's key covers everything it depends on
            inputs = {k: (self.keys[str(v[0])], v[1]) if isinstance(v, list) and len(v) == 2 and str(v[0]) in self.keys
                      else v for k, v in (self.prompt[nid].get("inputs") or {}).items()}
            self.keys[nid] = json.dumps([self.prompt[nid]["class_type"], inputs], sort_keys=True)
        self.cached = [nid for nid in self.order if self.keys[nid] in sim.cache]
        self.ui: dict[str, dict] = {}
        self.state: dict[str, dict] = {}
        self.messages: list = []

    async def add(self, event: str, data: dict, broadcast: bool = False) -> None:
        """A message the history entry keeps; without a client it is sent only if broadcast."""
        self.messages.append([event, data])
        if self.sid is not None or broadcast:
            await self.sim.send(event, data, self.sid)

    async def replay_cached(self) -> None:
        sim, pid, sid = self.sim, self.pid, self.sid
        for nid in self.cached:
            if nid in self.outputs and isinstance(sim.cache[self.keys[nid]], dict):
                self.ui[nid] = sim.cache[self.keys[nid]]
                await sim.send("executed", {"node": nid, "display_node": nid, "output": self.ui[nid],
                                            "prompt_id": pid}, sid)
                self.state[nid] = {"value": 1, "max": 1, "state": "finished", "node_id": nid, "prompt_id": pid,
                                   "display_node_id": nid, "parent_node_id": None, "real_node_id": nid}
        if self.state:
            await sim.send("progress_state", {"prompt_id": pid, "nodes": copy.deepcopy(self.state)}, sid)

    async def node(self, nid: str) -> bool:
        """Run one node; False when it ended the prompt (interrupted or failed)."""
        sim, pid, sid, state, node = self.sim, self.pid, self.sid, self.state, self.prompt[nid]
        state[nid] = {"value": 0.0, "max": 1.0, "state": "running", "node_id": nid, "prompt_id": pid,
                      "display_node_id": nid, "parent_node_id": None, "real_node_id": nid}
        await sim.send("progress_state", {"prompt_id": pid, "nodes": copy.deepcopy(state)}, sid)
        if sid is not None:
            await sim.send("executing", {"node": nid, "display_node": nid, "prompt_id": pid}, sid)
        try:
            out = await sim.run_node(nid, node, pid, sid, state)
        except asyncio.CancelledError:
            raise
        except InterruptedError:
            await self.add("execution_interrupted", {"prompt_id": pid, "node_id": nid,
                                                     "node_type": node["class_type"],
                                                     "executed": self.executed(),
                                                     "timestamp": _ms()}, broadcast=True)
            return False
        except Exception as ex:  # as ComfyUI's execution_error (execution.py handle_execution_error)
            await self.add("execution_error", {"prompt_id": pid, "node_id": nid, "node_type": node["class_type"],
                                               "executed": self.executed(),
                                               "exception_message": str(ex), "exception_type": type(ex).__name__,
                                               "traceback": [], "current_inputs": {}, "current_outputs": {},
                                               "timestamp": _ms()})
            return False
        sim.cache[self.keys[nid]] = out if out is not None else True
        if out is not None:
            self.ui[nid] = out
            if sid is not None:
                await sim.send("executed", {"node": nid, "display_node": nid, "output": out, "prompt_id": pid}, sid)
        state[nid].update(value=1.0, state="finished")
        await sim.send("progress_state", {"prompt_id": pid, "nodes": copy.deepcopy(state)}, sid)
        return True

    def executed(self) -> list[str]:
        return [n for n in self.order if n in self.ui or n in self.cached]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _constant(value: Any) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(value)
    return handler


class _Handlers:
    """SimPeer's HTTP and websocket side, one method a route."""

    def __init__(self, sim: SimPeer) -> None:
        self.sim = sim

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/ws", self.ws_handler),
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.interrupt),
            ("GET", "/history", self.history),
            ("GET", "/history/{pid}", self.history_item),
            ("POST", "/history", self.post_history),
            ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_node),
            # the jobs API: declared under /api like ComfyUI's, so also at /api/api/...
            ("GET", "/api/jobs", self.list_jobs),
            ("GET", "/api/jobs/{job_id}", self.get_job),
            ("POST", "/api/jobs/{job_id}/cancel", self.cancel_job),
            ("POST", "/api/jobs/cancel", self.cancel_jobs),
            ("POST", "/free", self.free),
            ("GET", "/node_replacements", self.node_replacements),
            # the single user's settings (app/app_settings.py, app/user_manager.py)
            ("GET", "/settings", self.get_settings),
            ("POST", "/settings", self.post_settings),
            ("GET", "/settings/{id}", self.get_setting),
            ("POST", "/settings/{id}", self.post_setting),
            ("GET", "/users", self.users),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.features),
            ("GET", "/embeddings", _constant([])),
            ("GET", "/extensions", _constant([])),
            ("GET", "/models", _constant(["checkpoints"])),
            ("GET", "/models/{folder}", self.models),
        ]

    @web.middleware
    async def auth_proxy(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.sim.token}":
            return web.Response(status=401, text="401: token required")
        return await handler(request)

    async def start_worker(self, app: web.Application) -> None:
        self.sim.worker = asyncio.create_task(self.sim.run_worker())

    async def stop_worker(self, app: web.Application) -> None:
        if self.sim.worker:
            self.sim.worker.cancel()
        for ws in list(self.sim.sockets.values()):
            await ws.close()

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        sim = self.sim
        sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        sim.sockets[sid] = ws
        await ws.send_json({"type": "status",
                            "data": {"status": {"exec_info": {"queue_remaining": sim.remaining()}}, "sid": sid}})
        first = True
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and first:
                    first = False
                    data = json.loads(msg.data)
                    if data.get("type") == "feature_flags":
                        sim.flags[sid] = data.get("data") or {}
                        await ws.send_json({"type": "feature_flags", "data": sim.feature_flags()})
        finally:
            if sim.sockets.get(sid) is ws:  # unlike ComfyUI: no same-clientId pitfall here
                sim.sockets.pop(sid, None)
        return ws

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError as e:  # ComfyUI itself answers 500 here
            return web.json_response(error_body(_err("invalid_prompt", "Invalid JSON in request body", str(e))),
                                     status=400)
        status, body = await self.sim.submit(data, request.headers.get("Comfy-Usage-Source"))
        return web.json_response(body, status=status)

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.sim.remaining()}})

    async def get_queue(self, request: web.Request) -> web.Response:
        sim = self.sim
        return web.json_response({"queue_running": [shown(sim.running)] if sim.running else [],
                                  "queue_pending": [shown(e[2]) for e in sim.queue]})

    async def post_queue(self, request: web.Request) -> web.Response:
        sim = self.sim
        data = await request.json()
        if data.get("clear"):
            sim.queue.clear()
        if data.get("delete"):
            sim.queue = [e for e in sim.queue if e[2][1] not in data["delete"]]
            heapq.heapify(sim.queue)
        await sim.status()
        return web.Response()

    async def interrupt(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            data = {}
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        if self.sim.running and (pid is None or self.sim.running[1] == pid):
            self.sim.interrupted = True
        return web.Response()

    async def history(self, request: web.Request) -> web.Response:
        q = request.rel_url.query
        max_items = int(q["max_items"]) if "max_items" in q else None
        offset = int(q["offset"]) if "offset" in q else -1
        return web.json_response(history_page(self.sim.history, max_items, offset))

    async def history_item(self, request: web.Request) -> web.Response:
        pid = request.match_info["pid"]
        return web.json_response({pid: self.sim.history[pid]} if pid in self.sim.history else {})

    async def post_history(self, request: web.Request) -> web.Response:
        data = await request.json()
        if data.get("clear"):
            self.sim.history.clear()
        for pid in data.get("delete", []):
            self.sim.history.pop(pid, None)
        return web.Response()

    async def view(self, request: web.Request) -> web.StreamResponse:
        q = request.rel_url.query
        name, typ = split_annotation(q.get("filename", ""))
        if not name or name[0] == "/" or ".." in name:
            return web.Response(status=400)
        path = self.sim.root / str(typ or q.get("type", "output")) / q.get("subfolder", "") / str(name)
        if not path.is_file():
            return web.Response(status=404)
        self.sim.views[str(path.relative_to(self.sim.root))] += 1
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{name}"'})

    async def upload(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post["image"]
        if not isinstance(image, web.FileField):
            return web.Response(status=400)
        typ, sub = str(post.get("type", "input")), str(post.get("subfolder", ""))
        folder = self.sim.root / typ / sub
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image.filename).write_bytes(image.file.read())
        return web.json_response({"name": image.filename, "subfolder": sub, "type": typ})

    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.object_info())

    async def object_info_node(self, request: web.Request) -> web.Response:
        cls, info = request.match_info["node_class"], self.sim.object_info()
        return web.json_response({cls: info[cls]} if cls in info else {})

    async def list_jobs(self, request: web.Request) -> web.Response:
        sim = self.sim
        try:
            q = jobs.parse_query(request.rel_url.query)
        except jobs.JobsError as e:
            return web.json_response(e.body(), status=400)
        queued = ([jobs.queue_job(sim.running, "in_progress")] if sim.running else []) + \
            [jobs.queue_job(e[2], "pending") for e in sim.queue]
        finished = (jobs.history_job(pid, entry) for pid, entry in sim.history.items())
        return web.json_response(jobs.list_jobs(queued, finished, q))

    async def get_job(self, request: web.Request) -> web.Response:
        job = self.sim.job(request.match_info["job_id"])
        return web.json_response(job) if job else web.json_response({"error": "Job not found"}, status=404)

    async def cancel_job(self, request: web.Request) -> web.Response:
        return web.json_response({"cancelled": await self.sim.cancel(request.match_info["job_id"])})

    async def cancel_jobs(self, request: web.Request) -> web.Response:
        try:
            ids = jobs.parse_cancel_ids(await request.json())
        except jobs.JobsError as e:
            return web.json_response(e.body(), status=400)
        except ValueError:
            return web.json_response({"error": "Request body must be valid JSON"}, status=400)
        cancelled = [await self.sim.cancel(i) for i in ids]  # every one, not only up to the first
        return web.json_response({"cancelled": any(cancelled)})

    async def free(self, request: web.Request) -> web.Response:
        data = await request.json()
        for key in ("unload_models", "free_memory"):
            if data.get(key):
                self.sim.free_flags[key] = data[key]
        self.sim.wake.set()
        return web.Response()

    async def node_replacements(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.replacements)

    async def get_settings(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.settings)

    async def post_settings(self, request: web.Request) -> web.Response:
        data = await request.json()
        if not isinstance(data, dict):
            return web.Response(status=400)
        self.sim.settings.update(data)
        self.sim.user_dir = True
        return web.Response()

    async def get_setting(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.settings.get(request.match_info["id"]))

    async def post_setting(self, request: web.Request) -> web.Response:
        self.sim.settings[request.match_info["id"]] = await request.json()
        self.sim.user_dir = True
        return web.Response()

    async def users(self, request: web.Request) -> web.Response:
        return web.json_response({"storage": "server", "migrated": self.sim.user_dir})

    async def system_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"system": {"os": "posix", "ram_total": 0, "ram_free": 0,
                                             "comfyui_version": "sim", "python_version": "", "pytorch_version": "",
                                             "embedded_python": False, "argv": ["sim"]},
                                  "devices": [{"name": f"{self.sim.name} (simulated)", "type": "sim", "index": 0,
                                               "vram_total": 0, "vram_free": 0, "torch_vram_total": 0,
                                               "torch_vram_free": 0}]})

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.feature_flags())

    async def models(self, request: web.Request) -> web.Response:
        if request.match_info["folder"] != "checkpoints":
            return web.Response(status=404)
        return web.json_response(self.sim.checkpoints)


@dataclass
class SimServer:
    sim: SimPeer
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_sim(port: int = 0, host: str = "127.0.0.1", root: Path | None = None, **kw: Any) -> SimServer:
    """Start a simulated peer in this event loop."""
    sim = SimPeer(root or Path(tempfile.mkdtemp(prefix="comfylb-sim-")), **kw)
    runner = web.AppRunner(sim.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return SimServer(sim, runner, runner.addresses[0][1])


def main() -> None:
    ap = argparse.ArgumentParser(description="A SIMULATED ComfyUI peer (model-free nodes, no real rendering).")
    ap.add_argument("--port", type=int, default=8288)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--name", default="sim")
    ap.add_argument("--dir", help="where inputs/outputs go (default: a new temporary folder)")
    ap.add_argument("--slowdown", type=float, default=1.0, help="multiply every sleep (2 = a GPU half as fast)")
    ap.add_argument("--model-load", type=float, default=0.0, help="seconds to load a checkpoint not in memory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sim = SimPeer(Path(args.dir or tempfile.mkdtemp(prefix="comfylb-sim-")), args.name, args.slowdown, args.model_load)
    log.info("simulated ComfyUI peer %s on http://%s:%d (not a real ComfyUI)", args.name, args.host, args.port)
    web.run_app(sim.app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
