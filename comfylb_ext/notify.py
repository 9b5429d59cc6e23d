"""Telling the outside that something changed: the live snapshot for the panel (coalesced,
to the sockets that subscribed) and ComfyUI's `status` message (queue_remaining, to all)."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

from .relay import Hub

STATUS_EVENT = "comfylb.status"   # the custom websocket event that carries live state
WAITING_EVENT = "comfylb.waiting"  # to a submitter: its prompt waits for a peer, and why
PUSH_EVERY = 0.1                  # seconds: at most this many pushes of it per second

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class Notifier:
    def __init__(self, hub: Hub, spawn: Spawn, snapshot: Callable[[], dict], remaining: Callable[[], int]) -> None:
        self.hub = hub
        self.spawn = spawn
        self.snapshot = snapshot
        self.remaining = remaining
        self.state_changed = asyncio.Event()  # set, then replaced, on every changed()
        self._push_at: float | None = None

    def changed(self) -> None:
        """Something a management view shows has changed: push a snapshot soon.  Bursts
        (a hundred progress events a second) coalesce into at most one push per PUSH_EVERY."""
        self.state_changed.set()
        self.state_changed = asyncio.Event()
        if self._push_at is not None:
            return
        loop = asyncio.get_running_loop()
        self._push_at = loop.time()
        loop.call_later(PUSH_EVERY, self._push)

    def _push(self) -> None:
        self._push_at = None
        self.spawn(self.hub.send_watchers(STATUS_EVENT, self.snapshot()))  # not every socket: see Hub.watch

    async def status(self) -> None:
        """ComfyUI's status message: how many prompts are unfinished."""
        await self.hub.send_json("status", {"status": {"exec_info": {"queue_remaining": self.remaining()}}})

    def queue_changed(self) -> None:
        self.spawn(self.status())

    def tell_waiting(self, client_id: str, prompt_id: str, reason: str) -> None:
        """A submitter hears why its prompt waits, as custom nodes tell the web UI things:
        an event on its socket (the sidebar extension shows it as a toast).  Peer names
        and errors stay on /lb/*: any client may read this."""
        self.spawn(self.hub.send_json(WAITING_EVENT, {"prompt_id": prompt_id, "reason": reason}, client_id))
