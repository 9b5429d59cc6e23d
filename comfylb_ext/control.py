"""Queue control, as clients and operators ask for it: delete, clear, cancel, interrupt.

Pending prompts may be here or already in a peer's own queue; each request does what one
ComfyUI would do to its own queue, across the cluster."""
from __future__ import annotations

import logging
from typing import Callable, Mapping

from .ledger import Ledger
from .notify import Notifier
from .peer import Peer, PeerError
from .recovery import Recovery
from .tasks import CANCELLED, DISPATCHED, QUEUED, RUNNING, Task

log = logging.getLogger(__name__)


class QueueControl:
    def __init__(self, ledger: Ledger, peers: Mapping[str, Peer], recovery: Recovery, notify: Notifier,
                 pump: Callable[[], None]) -> None:
        self.ledger = ledger
        self.peers = peers
        self.recovery = recovery
        self.notify = notify
        self.pump = pump

    async def delete(self, prompt_ids: list[str]) -> None:
        """POST /queue {delete}: pending prompts leave the queue; dispatched ones are
        deleted on their peer; running ones are left alone, as in ComfyUI."""
        for pid in prompt_ids:
            await self._dequeue(pid)
        await self._settled()

    async def clear(self) -> None:
        # each one as it is now: while a client hears of one's end, a queued one may be
        # dispatched (then it is deleted on its peer) or have started (then it is left alone)
        for task in list(self.ledger.queue):
            await self._dequeue(task.prompt_id)
        for task in [t for t in self.ledger.tasks.values() if t.state == DISPATCHED]:
            await self._dequeue(task.prompt_id)
        await self._settled()

    async def _settled(self) -> None:
        await self.notify.status()
        self.pump()

    async def _dequeue(self, pid: str) -> bool:
        """A pending prompt (here or in its peer's queue) never runs: True if it was taken.
        It ends silently, as ComfyUI drops a deleted queue item."""
        task = self.ledger.tasks.get(pid)
        if task is None or task.state not in (QUEUED, DISPATCHED):
            return False
        if task.state == DISPATCHED and not await self._off_peer(task):
            return False
        await self.ledger.cancelled(task)
        return True

    async def _off_peer(self, task: Task) -> bool:
        peer = self.peers.get(task.peer) if task.peer else None
        return peer is not None and await self.recovery.withdraw(task, peer)

    async def cancel_job(self, prompt_id: str) -> bool:
        """POST /api/jobs/{id}/cancel, as today's ComfyUI: a pending job is dequeued
        silently, a running one interrupted on its peer; True if either happened."""
        task = self.ledger.tasks.get(prompt_id)
        if task is None:
            return False
        if task.state != RUNNING and await self._dequeue(prompt_id):
            await self._settled()
            return True
        if self.ledger.tasks.get(prompt_id) is not task:
            return False  # it ended meanwhile
        return await self.interrupt(prompt_id)

    async def cancel(self, prompt_id: str) -> bool:
        """An operator's cancel: a queued task never runs, a dispatched one leaves its
        peer's queue, a running one is interrupted.  The client hears what ComfyUI says of
        an interrupted prompt, so a script waiting for it is not left hanging."""
        task = self.ledger.tasks.get(prompt_id)
        if task is None:
            return False
        if task.state == QUEUED or (task.state == DISPATCHED and await self._off_peer(task)):
            await self.ledger.cancelled(task, tell=True)
        if task.state != CANCELLED:  # running (or it started while we asked its peer)
            await self.interrupt(prompt_id)
            return True
        self.pump()
        return True

    async def interrupt(self, prompt_id: str | None) -> bool:
        """POST /interrupt.  Without a prompt_id a single ComfyUI stops the one prompt it
        is running, whoever queued it: here that is the running prompt queued first, so
        one caller's interrupt never stops every peer.  True if a peer was asked."""
        if prompt_id is None:
            running = self.ledger.running()
            if not running:
                return False
            prompt_id = min(running, key=lambda t: (t.number, t.seq)).prompt_id
        task = self.ledger.tasks.get(prompt_id)
        peer: Peer | None = self.peers.get(task.peer) if task is not None and task.peer else None
        if peer is None:
            return False
        try:
            status, _ = await peer.post_json("/interrupt", {"prompt_id": prompt_id})
        except PeerError as e:
            log.warning("peer %s: interrupt failed: %s", peer.name, e)
            return False
        return status == 200
