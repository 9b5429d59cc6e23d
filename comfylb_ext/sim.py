"""A simulated ComfyUI peer, for fast unit tests, demos and benchmarks.

    python -m comfylb_ext.sim --port 8288 [--slowdown 2] [--model-load 1.5]

It speaks today's ComfyUI (server ~0.38, shared/comfyui/api-current.md) over HTTP and
websocket, with the message sequence recorded from real ComfyUI (shared/comfyui/transcript.md),
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
from typing import Any

from aiohttp import WSMsgType, web

from . import jobs, replacements
from .uploads import TYPES, split_annotation
from .validation import error_body, validate

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

    def _order(self, prompt: dict, outputs: list[str]) -> list[str]:
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
        number, pid, prompt, extra, outputs = item
        sid = extra.get("client_id")
        messages: list = []

        def ts() -> int:
            return int(time.time() * 1000)

        async def add(event: str, data: dict, broadcast: bool = False) -> None:
            messages.append([event, data])
            if sid is not None or broadcast:
                await self.send(event, data, sid)

        self.interrupted = False
        self.executed.append(pid)
        order = self._order(prompt, outputs)
        keys: dict[str, str] = {}
        for nid in order:  # upstream first, so a node's key covers everything it depends on
            inputs = {k: (keys[str(v[0])], v[1]) if isinstance(v, list) and len(v) == 2 and str(v[0]) in keys else v
                      for k, v in (prompt[nid].get("inputs") or {}).items()}
            keys[nid] = json.dumps([prompt[nid]["class_type"], inputs], sort_keys=True)
        cached = [nid for nid in order if keys[nid] in self.cache]
        ui: dict[str, dict] = {}
        state: dict[str, dict] = {}
        await add("execution_start", {"prompt_id": pid, "timestamp": ts()})
        await add("execution_cached", {"nodes": cached, "prompt_id": pid, "timestamp": ts()})
        for nid in cached:
            if nid in outputs and isinstance(self.cache[keys[nid]], dict):
                ui[nid] = self.cache[keys[nid]]
                await self.send("executed", {"node": nid, "display_node": nid, "output": ui[nid], "prompt_id": pid}, sid)
                state[nid] = {"value": 1, "max": 1, "state": "finished", "node_id": nid, "prompt_id": pid,
                              "display_node_id": nid, "parent_node_id": None, "real_node_id": nid}
        if state:
            await self.send("progress_state", {"prompt_id": pid, "nodes": copy.deepcopy(state)}, sid)
        status_str = "success"
        for nid in order:
            if nid in cached:
                continue
            node = prompt[nid]
            state[nid] = {"value": 0.0, "max": 1.0, "state": "running", "node_id": nid, "prompt_id": pid,
                          "display_node_id": nid, "parent_node_id": None, "real_node_id": nid}
            await self.send("progress_state", {"prompt_id": pid, "nodes": copy.deepcopy(state)}, sid)
            if sid is not None:
                await self.send("executing", {"node": nid, "display_node": nid, "prompt_id": pid}, sid)
            try:
                out = await self.run_node(nid, node, pid, sid, state)
            except asyncio.CancelledError:
                raise
            except InterruptedError:
                await add("execution_interrupted", {"prompt_id": pid, "node_id": nid,
                                                    "node_type": node["class_type"],
                                                    "executed": [n for n in order if n in ui or n in cached],
                                                    "timestamp": ts()}, broadcast=True)
                status_str = "error"
                break
            except Exception as ex:  # as ComfyUI's execution_error (execution.py handle_execution_error)
                await add("execution_error", {"prompt_id": pid, "node_id": nid, "node_type": node["class_type"],
                                              "executed": [n for n in order if n in ui or n in cached],
                                              "exception_message": str(ex), "exception_type": type(ex).__name__,
                                              "traceback": [], "current_inputs": {}, "current_outputs": {},
                                              "timestamp": ts()})
                status_str = "error"
                break
            self.cache[keys[nid]] = out if out is not None else True
            if out is not None:
                ui[nid] = out
                if sid is not None:
                    await self.send("executed", {"node": nid, "display_node": nid, "output": out, "prompt_id": pid}, sid)
            state[nid].update(value=1.0, state="finished")
            await self.send("progress_state", {"prompt_id": pid, "nodes": copy.deepcopy(state)}, sid)
        # Like ComfyUI's default (classic) cache: what the last prompt did not use is dropped.
        self.cache = {k: v for k, v in self.cache.items() if k in set(keys.values())}
        if status_str == "success":
            await add("execution_success", {"prompt_id": pid, "timestamp": ts()})
        # As ComfyUI's task_done: out of the running list and into history at once, then the
        # status broadcast (queue_remaining no longer counts it), then executing null.
        self.history[pid] = {
            "prompt": shown(item),
            "outputs": ui,
            "status": {"status_str": status_str, "completed": status_str == "success", "messages": messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in ui},
        }
        self.running = None
        await self.status()
        if sid is not None:
            await self.send("executing", {"node": None, "prompt_id": pid}, sid)

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
            return 400, error_body(error, node_errors)
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
        r = web.RouteTableDef()

        @r.get("/ws")
        async def ws_handler(request: web.Request) -> web.WebSocketResponse:
            sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
            ws = web.WebSocketResponse(max_msg_size=0)
            await ws.prepare(request)
            self.sockets[sid] = ws
            await ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": self.remaining()}}, "sid": sid}})
            first = True
            try:
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT and first:
                        first = False
                        data = json.loads(msg.data)
                        if data.get("type") == "feature_flags":
                            self.flags[sid] = data.get("data") or {}
                            await ws.send_json({"type": "feature_flags", "data": self.feature_flags()})
            finally:
                if self.sockets.get(sid) is ws:  # unlike ComfyUI: no same-clientId pitfall here
                    self.sockets.pop(sid, None)
            return ws

        @r.post("/prompt")
        async def post_prompt(request: web.Request) -> web.Response:
            try:
                data = await request.json()
            except ValueError as e:  # ComfyUI itself answers 500 here
                return web.json_response(error_body(_err("invalid_prompt", "Invalid JSON in request body", str(e))),
                                         status=400)
            status, body = await self.submit(data, request.headers.get("Comfy-Usage-Source"))
            return web.json_response(body, status=status)

        @r.get("/prompt")
        async def get_prompt(request: web.Request) -> web.Response:
            return web.json_response({"exec_info": {"queue_remaining": self.remaining()}})

        @r.get("/queue")
        async def get_queue(request: web.Request) -> web.Response:
            return web.json_response({"queue_running": [shown(self.running)] if self.running else [],
                                      "queue_pending": [shown(e[2]) for e in self.queue]})

        @r.post("/queue")
        async def post_queue(request: web.Request) -> web.Response:
            data = await request.json()
            if data.get("clear"):
                self.queue.clear()
            if data.get("delete"):
                self.queue = [e for e in self.queue if e[2][1] not in data["delete"]]
                heapq.heapify(self.queue)
            await self.status()
            return web.Response()

        @r.post("/interrupt")
        async def interrupt(request: web.Request) -> web.Response:
            try:
                data = await request.json()
            except ValueError:
                data = {}
            pid = data.get("prompt_id") if isinstance(data, dict) else None
            if self.running and (pid is None or self.running[1] == pid):
                self.interrupted = True
            return web.Response()

        @r.get("/history")
        async def history(request: web.Request) -> web.Response:
            q = request.rel_url.query
            max_items = int(q["max_items"]) if "max_items" in q else None
            offset = int(q["offset"]) if "offset" in q else -1
            return web.json_response(history_page(self.history, max_items, offset))

        @r.get("/history/{pid}")
        async def history_item(request: web.Request) -> web.Response:
            pid = request.match_info["pid"]
            return web.json_response({pid: self.history[pid]} if pid in self.history else {})

        @r.post("/history")
        async def post_history(request: web.Request) -> web.Response:
            data = await request.json()
            if data.get("clear"):
                self.history.clear()
            for pid in data.get("delete", []):
                self.history.pop(pid, None)
            return web.Response()

        @r.get("/view")
        async def view(request: web.Request) -> web.StreamResponse:
            q = request.rel_url.query
            name, typ = split_annotation(q.get("filename", ""))
            if not name or name[0] == "/" or ".." in name:
                return web.Response(status=400)
            path = self.root / (typ or q.get("type", "output")) / q.get("subfolder", "") / name
            if not path.is_file():
                return web.Response(status=404)
            self.views[str(path.relative_to(self.root))] += 1
            return web.FileResponse(path, headers={"Content-Disposition": f'filename="{name}"'})

        @r.post("/upload/image")
        async def upload(request: web.Request) -> web.Response:
            post = await request.post()
            image = post["image"]
            typ, sub = post.get("type", "input"), post.get("subfolder", "")
            folder = self.root / typ / sub
            folder.mkdir(parents=True, exist_ok=True)
            (folder / image.filename).write_bytes(image.file.read())
            return web.json_response({"name": image.filename, "subfolder": sub, "type": typ})

        @r.get("/object_info")
        async def object_info(request: web.Request) -> web.Response:
            return web.json_response(self.object_info())

        @r.get("/object_info/{node_class}")
        async def object_info_node(request: web.Request) -> web.Response:
            cls, info = request.match_info["node_class"], self.object_info()
            return web.json_response({cls: info[cls]} if cls in info else {})

        # -- the jobs API: declared under /api like ComfyUI's, so also at /api/api/... --
        @r.get("/api/jobs")
        async def list_jobs(request: web.Request) -> web.Response:
            try:
                q = jobs.parse_query(request.rel_url.query)
            except jobs.JobsError as e:
                return web.json_response(e.body(), status=400)
            queued = ([jobs.queue_job(self.running, "in_progress")] if self.running else []) + \
                [jobs.queue_job(e[2], "pending") for e in self.queue]
            finished = (jobs.history_job(pid, entry) for pid, entry in self.history.items())
            return web.json_response(jobs.list_jobs(queued, finished, q))

        @r.get("/api/jobs/{job_id}")
        async def get_job(request: web.Request) -> web.Response:
            job = self.job(request.match_info["job_id"])
            return web.json_response(job) if job else web.json_response({"error": "Job not found"}, status=404)

        @r.post("/api/jobs/{job_id}/cancel")
        async def cancel_job(request: web.Request) -> web.Response:
            return web.json_response({"cancelled": await self.cancel(request.match_info["job_id"])})

        @r.post("/api/jobs/cancel")
        async def cancel_jobs(request: web.Request) -> web.Response:
            try:
                ids = jobs.parse_cancel_ids(await request.json())
            except jobs.JobsError as e:
                return web.json_response(e.body(), status=400)
            except ValueError:
                return web.json_response({"error": "Request body must be valid JSON"}, status=400)
            cancelled = [await self.cancel(i) for i in ids]  # every one, not only up to the first
            return web.json_response({"cancelled": any(cancelled)})

        @r.post("/free")
        async def free(request: web.Request) -> web.Response:
            data = await request.json()
            for key in ("unload_models", "free_memory"):
                if data.get(key):
                    self.free_flags[key] = data[key]
            self.wake.set()
            return web.Response()

        @r.get("/node_replacements")
        async def node_replacements(request: web.Request) -> web.Response:
            return web.json_response(self.replacements)

        # -- the single user's settings (app/app_settings.py, app/user_manager.py) --
        @r.get("/settings")
        async def get_settings(request: web.Request) -> web.Response:
            return web.json_response(self.settings)

        @r.post("/settings")
        async def post_settings(request: web.Request) -> web.Response:
            data = await request.json()
            if not isinstance(data, dict):
                return web.Response(status=400)
            self.settings.update(data)
            self.user_dir = True
            return web.Response()

        @r.get("/settings/{id}")
        async def get_setting(request: web.Request) -> web.Response:
            return web.json_response(self.settings.get(request.match_info["id"]))

        @r.post("/settings/{id}")
        async def post_setting(request: web.Request) -> web.Response:
            self.settings[request.match_info["id"]] = await request.json()
            self.user_dir = True
            return web.Response()

        @r.get("/users")
        async def users(request: web.Request) -> web.Response:
            return web.json_response({"storage": "server", "migrated": self.user_dir})

        @r.get("/system_stats")
        async def system_stats(request: web.Request) -> web.Response:
            return web.json_response({"system": {"os": "posix", "ram_total": 0, "ram_free": 0,
                                                 "comfyui_version": "sim", "python_version": "", "pytorch_version": "",
                                                 "embedded_python": False, "argv": ["sim"]},
                                      "devices": [{"name": f"{self.name} (simulated)", "type": "sim", "index": 0,
                                                   "vram_total": 0, "vram_free": 0, "torch_vram_total": 0,
                                                   "torch_vram_free": 0}]})

        @r.get("/features")
        async def features(request: web.Request) -> web.Response:
            return web.json_response(self.feature_flags())

        for path, value in (("/embeddings", []), ("/extensions", []), ("/models", ["checkpoints"])):
            r.get(path)(_constant(value))

        @r.get("/models/{folder}")
        async def models(request: web.Request) -> web.Response:
            if request.match_info["folder"] != "checkpoints":
                return web.Response(status=404)
            return web.json_response(self.checkpoints)

        @web.middleware
        async def auth_proxy(request: web.Request, handler):
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.Response(status=401, text="401: token required")
            return await handler(request)

        app = web.Application(client_max_size=MAX_UPLOAD_SIZE, middlewares=[auth_proxy] if self.token else [])
        # as ComfyUI's add_routes: every route under /api too, then bare
        app.add_routes([web.RouteDef(d.method, "/api" + d.path, d.handler, d.kwargs)
                        for d in r if isinstance(d, web.RouteDef)])
        app.add_routes(r)

        async def start_worker(app: web.Application) -> None:
            self.worker = asyncio.create_task(self.run_worker())

        async def stop_worker(app: web.Application) -> None:
            if self.worker:
                self.worker.cancel()
            for ws in list(self.sockets.values()):
                await ws.close()

        app.on_startup.append(start_worker)
        app.on_shutdown.append(stop_worker)
        return app


def _constant(value: Any):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(value)
    return handler


@dataclass
class SimServer:
    sim: SimPeer
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_sim(port: int = 0, host: str = "127.0.0.1", root: Path | None = None, **kw) -> SimServer:
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
