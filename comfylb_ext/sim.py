"""A simulated ComfyUI peer, for fast unit tests, demos and benchmarks.

    python -m comfylb_ext.sim --port 8288 [--slowdown 2] [--model-load 1.5]

It speaks ComfyUI's HTTP and websocket protocol with the message sequence recorded from
real ComfyUI (shared/comfyui/transcript.md) for a small set of model-free nodes, and
renders no real images (solid-colour PNGs).  It never stands in for the real-peer tests.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import heapq
import itertools
import json
import logging
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

from .uploads import TYPES, split_annotation
from .validation import error_body, validate

log = logging.getLogger(__name__)


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
                 checkpoints: list[str] | None = None, token: str = "") -> None:
        self.root, self.name = root, name
        self.token = token  # like a peer behind an auth proxy: every request needs it
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
    async def run_worker(self) -> None:
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            item = heapq.heappop(self.queue)[2]
            self.running = item
            await self.status()
            try:
                await self.execute(item)
            finally:
                self.running = None

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
        self.history[pid] = {
            "prompt": [number, pid, prompt, {k: v for k, v in extra.items()
                                             if k not in ("auth_token_comfy_org", "api_key_comfy_org")}, outputs],
            "outputs": ui,
            "status": {"status_str": status_str, "completed": status_str == "success", "messages": messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in ui},
        }
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
            sub, _, base = prefix.rpartition("/")
            folder = self.root / typ / sub
            folder.mkdir(parents=True, exist_ok=True)
            n = 1 + max([int(p.stem.split("_")[-2]) for p in folder.glob(f"{base}_*_.png")
                         if p.stem.split("_")[-2].isdigit()] or [0])
            name = f"{base}_{n:05d}_.png"
            (folder / name).write_bytes(png(8, 8, (hash(pid) & 0xFFFFFF)))
            return {"images": [{"filename": name, "subfolder": sub, "type": typ}]}
        elif cls == "SaveImageWebsocket":
            for i in range(2):
                await self.send("progress", {"value": i, "max": 2, "prompt_id": pid, "node": nid}, sid)
                await self.send_preview(png(8, 8, 0x0000FF), pid, nid, sid)
        return None

    # -- HTTP --------------------------------------------------------------------------------
    def object_info(self) -> dict:
        inputs = [p.relative_to(self.root / "input").as_posix() for p in (self.root / "input").rglob("*") if p.is_file()]
        return catalog(inputs, self.checkpoints)

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
                            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True, "max_upload_size": 104857600}})
            finally:
                if self.sockets.get(sid) is ws:  # unlike ComfyUI: no same-clientId pitfall here
                    self.sockets.pop(sid, None)
            return ws

        @r.post("/prompt")
        async def post_prompt(request: web.Request) -> web.Response:
            data = await request.json()
            number = self.number if data.get("number") is None else float(data["number"])
            if data.get("number") is None:
                self.number += 1
            if "prompt" not in data:
                return web.json_response(error_body({"type": "no_prompt", "message": "No prompt provided",
                                                     "details": "No prompt provided", "extra_info": {}}), status=400)
            pid = str(data.get("prompt_id") or uuid.uuid4())
            ok, error, outputs, node_errors = validate(data["prompt"], self.object_info(),
                                                       data.get("partial_execution_targets"))
            if not ok:
                return web.json_response(error_body(error, node_errors), status=400)
            extra = dict(data.get("extra_data") or {})
            if "client_id" in data:
                extra["client_id"] = data["client_id"]
            heapq.heappush(self.queue, (number, next(self.counter), [number, pid, data["prompt"], extra, outputs]))
            self.wake.set()
            await self.status()
            return web.json_response({"prompt_id": pid, "number": number, "node_errors": node_errors})

        @r.get("/prompt")
        async def get_prompt(request: web.Request) -> web.Response:
            return web.json_response({"exec_info": {"queue_remaining": self.remaining()}})

        @r.get("/queue")
        async def get_queue(request: web.Request) -> web.Response:
            return web.json_response({"queue_running": [self.running] if self.running else [],
                                      "queue_pending": [e[2] for e in self.queue]})

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
            return web.json_response(self.history)

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
            return web.json_response({"supports_preview_metadata": True, "max_upload_size": 104857600})

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

        app = web.Application(client_max_size=104857600, middlewares=[auth_proxy] if self.token else [])
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
