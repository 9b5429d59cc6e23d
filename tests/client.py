"""A ComfyUI client that knows nothing of ComfyLB, as scripts and bots write them."""
from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Run:
    prompt_id: str
    messages: list[tuple[str, Any]] = field(default_factory=list)
    binary: list[bytes] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    latency_ms: list[float] = field(default_factory=list)  # arrival minus the peer's own timestamp

    def types(self) -> list[str]:
        return [t for t, _ in self.messages]

    def first(self, event: str) -> Any:
        return next(d for t, d in self.messages if t == event)


class Client:
    """One websocket under one clientId, many prompts; messages sorted by prompt_id."""

    def __init__(self, base: str, client_id: str | None = None, flags: bool = False) -> None:
        self.base = base
        self.client_id = client_id or uuid.uuid4().hex
        self.flags = flags
        self.runs: dict[str, Run] = {}
        self.status: list[dict] = []
        self.hello: dict | None = None
        self.feature_reply: dict | None = None
        self.other: list[tuple[str, Any]] = []
        self._other_seen = asyncio.Condition()
        self._any_message = asyncio.Condition()
        self._early: dict[str, list] = {}
        self._connected = asyncio.Event()

    async def __aenter__(self) -> "Client":
        self.session = aiohttp.ClientSession()
        ws_url = self.base.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0)
        if self.flags:
            await self.ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.session.close()

    async def _read(self) -> None:
        self._last_pid: str | None = None
        async for msg in self.ws:
            await self._handle(msg)
            async with self._any_message:
                self._any_message.notify_all()

    async def _handle(self, msg) -> None:
        if msg.type == aiohttp.WSMsgType.BINARY:
            pid = self._last_pid  # binary frames belong to the prompt that spoke last
            if pid is None:
                return
            if pid in self.runs:
                self.runs[pid].binary.append(msg.data)
            else:
                self._early.setdefault(pid, []).append((None, msg.data))
            return
        if msg.type != aiohttp.WSMsgType.TEXT:
            return
        m = json.loads(msg.data)
        t, d = m["type"], m["data"]
        if t == "status":
            if "sid" in d:
                self.hello = d
                self._connected.set()
            self.status.append(d)
            return
        if t == "feature_flags":
            self.feature_reply = d
            return
        pid = d.get("prompt_id") if isinstance(d, dict) else None
        if pid is None:
            self.other.append((t, d))
            async with self._other_seen:
                self._other_seen.notify_all()
            return
        self._last_pid = pid
        run = self.runs.get(pid)
        if run is None:
            self._early.setdefault(pid, []).append((t, d))
            return
        run.messages.append((t, d))
        if isinstance(d.get("timestamp"), (int, float)):
            run.latency_ms.append(time.time() * 1000 - d["timestamp"])
        if t == "executing" and d.get("node") is None:
            run.done.set()

    async def until(self, cond, timeout: float = 60) -> None:
        """Wait until `cond()` holds, re-checking whenever a websocket message arrives."""
        async def wait():
            async with self._any_message:
                await self._any_message.wait_for(cond)
        await asyncio.wait_for(wait(), timeout)

    async def subscribe(self, **kw) -> None:
        """Ask for the comfylb.status pushes on this socket (they reach no socket unasked)."""
        status, body = await self.post("/lb/subscribe", {"client_id": self.client_id}, **kw)
        assert status == 200, (status, body)
        self.subscribed = True

    async def wait_event(self, event: str, pred, timeout: float = 60) -> Any:
        """The first `event` message (not tied to a prompt) whose data satisfies `pred`,
        waiting for it if it has not come yet; earlier ones are consumed."""
        if event == "comfylb.status" and not getattr(self, "subscribed", False):
            await self.subscribe()
        async def find():
            async with self._other_seen:
                while True:
                    while self.other:
                        t, d = self.other.pop(0)
                        if t == event and pred(d):
                            return d
                    await self._other_seen.wait()
        return await asyncio.wait_for(find(), timeout)

    def _track(self, pid: str) -> Run:
        run = self.runs.setdefault(pid, Run(pid))
        for t, d in self._early.pop(pid, []):
            if t is None:
                run.binary.append(d)
                continue
            run.messages.append((t, d))
            if t == "executing" and d.get("node") is None:
                run.done.set()
        return run

    async def post(self, path: str, body: Any = None, **kw) -> tuple[int, Any]:
        async with self.session.post(self.base + path, json=body, **kw) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text) if text else None
            except ValueError:
                return r.status, text

    async def get(self, path: str, **kw) -> tuple[int, Any]:
        async with self.session.get(self.base + path, **kw) as r:
            if "json" in r.content_type:
                return r.status, await r.json()
            return r.status, await r.read()

    async def queue(self, prompt: dict, prefix: str = "", **extra) -> tuple[int, Any, Run | None]:
        status, body = await self.post(f"{prefix}/prompt", {"prompt": prompt, "client_id": self.client_id, **extra})
        run = self._track(body["prompt_id"]) if status == 200 else None
        return status, body, run

    async def run(self, prompt: dict, timeout: float = 120, **extra) -> Run:
        status, body, run = await self.queue(prompt, **extra)
        assert status == 200, body
        await asyncio.wait_for(run.done.wait(), timeout)
        return run


def sleep_prompt(seconds: float, prefix: str = "sleep") -> dict:
    """TestSleep with a random colour, so no peer serves it from its cache."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                     "color": random.randrange(1 << 24)}},
        "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def invert_prompt(prefix: str = "lbtest") -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1,
                                                     "color": random.randrange(1 << 24)}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }
