"""Per-client delivery order: each client socket sees what one ComfyUI would show it.

A single ComfyUI runs one prompt at a time, and widely used client libraries rely on it
(they take any prompt's `execution_success` on their socket as the end of theirs).  The
cluster runs one client's prompts on several peers at once, so by default a client gets
one prompt's messages at a time, in queue order: the messages of a later prompt are held
and released, in order, the moment the earlier prompt has ended.  Execution stays
parallel; only delivery is ordered.  A client that handles interleaved prompts says so in
its `feature_flags` (INTERLEAVE_FLAG) and gets every message as it comes.

Pure bookkeeping plus one awaitable `send` per message: no sockets here.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

INTERLEAVE_FLAG = "comfylb_interleave"
HELD_MAX = 20000          # messages held for one client before it gets them live instead
HELD_BYTES_MAX = 256 << 20

Send = Callable[[], Awaitable[None]]


@dataclass
class _Client:
    order: list[tuple[tuple, str]] = field(default_factory=list)  # (queue key, prompt id) of unfinished prompts
    ids: set[str] = field(default_factory=set)  # the prompt ids in `order`
    current: str | None = None      # the prompt whose messages go out live
    flushing: str | None = None     # the prompt whose held messages are going out now
    held: dict[str, list[tuple[Send, int]]] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)  # ended while held: released with the rest
    held_bytes: int = 0
    held_count: int = 0
    live: bool = False              # held too much: everything goes out as it comes


class Delivery:
    def __init__(self, ordered: bool = True) -> None:
        self.ordered = ordered
        self._clients: dict[str, _Client] = {}

    def expect(self, client_id: str | None, prompt_id: str, key: tuple) -> None:
        """A prompt of this client's was queued; `key` sorts it as the queue does."""
        if not self.ordered or not client_id:
            return
        c = self._clients.setdefault(client_id, _Client())
        if prompt_id not in c.ids:
            c.ids.add(prompt_id)
            bisect.insort(c.order, (key, prompt_id))

    def held(self, client_id: str) -> int:
        c = self._clients.get(client_id)
        return c.held_count if c else 0

    async def send(self, client_id: str | None, prompt_id: str | None, send: Send, size: int = 0,
                   interleave: bool = False) -> None:
        """Deliver one message of `prompt_id` now, or hold it until its turn."""
        c = self._clients.get(client_id) if client_id and prompt_id else None
        if c is None or interleave or c.live or prompt_id not in c.ids:
            await send()
            return
        if prompt_id == c.current or (c.current is None and c.flushing is None and c.order[0][1] == prompt_id):
            c.current = prompt_id
            await send()
            return
        c.held.setdefault(prompt_id, []).append((send, size))
        c.held_bytes += size
        c.held_count += 1
        if c.held_count > HELD_MAX or c.held_bytes > HELD_BYTES_MAX:
            log.warning("client %s: %d bytes held for prompts waiting their turn; it gets them live from now on",
                        client_id, c.held_bytes)
            c.live = True
            await self._release_all(c)

    async def end(self, client_id: str | None, prompt_id: str) -> None:
        """The prompt will send nothing more (finished, failed, cancelled, deleted)."""
        c = self._clients.get(client_id) if client_id else None
        if c is None or client_id is None:
            return
        if prompt_id != c.current:
            if prompt_id in c.held or prompt_id == c.flushing:
                c.ended.add(prompt_id)  # its messages go out in its turn, then it is done
                return
            self._drop(c, prompt_id)
            if c.current is None and c.flushing is None:
                await self._advance(client_id, c)
            return
        self._drop(c, prompt_id)
        c.current = None
        await self._advance(client_id, c)

    def _drop(self, c: _Client, prompt_id: str) -> None:
        if prompt_id in c.ids:
            c.ids.discard(prompt_id)
            c.order = [(k, pid) for k, pid in c.order if pid != prompt_id]
        c.ended.discard(prompt_id)
        for _, size in c.held.pop(prompt_id, []):
            c.held_bytes -= size
            c.held_count -= 1

    async def _advance(self, client_id: str, c: _Client) -> None:
        """The next prompt in queue order gets its turn: what it said so far goes out."""
        while c.order and c.current is None and c.flushing is None:
            head = c.order[0][1]
            c.flushing = head
            queue = c.held.get(head, [])
            sent = 0
            while sent < len(queue):  # messages arriving meanwhile join the end of this list
                send, size = queue[sent]
                sent += 1
                c.held_bytes -= size
                c.held_count -= 1
                await send()
            c.held.pop(head, None)
            c.flushing = None
            if head in c.ended:
                self._drop(c, head)
                continue
            c.current = head
        if not c.order and not c.held:
            self._clients.pop(client_id, None)

    async def _release_all(self, c: _Client) -> None:
        for _, pid in list(c.order):
            for send, _ in c.held.pop(pid, []):
                await send()
        c.held_bytes = c.held_count = 0
