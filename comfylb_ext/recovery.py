"""What happens when a peer is lost, stalls or comes back, and when an idle peer should
take work back from a busy one.  A collaborator of the Cluster (dispatcher.py): it reads
the peers, and changes tasks only through the ledger."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Coroutine, Mapping
from urllib.parse import quote

from .errors import execution_error
from .health import UNHEALTHY
from .peer import Peer, PeerError
from .config import QueueConfig
from .ledger import Ledger
from .relay import Relay
from .tasks import DISPATCHED, Task

log = logging.getLogger(__name__)

TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class Recovery:
    def __init__(self, *, cfg: QueueConfig, ledger: Ledger, relay: Relay, peers: Mapping[str, Peer],
                 spawn: Callable[[Coroutine[Any, Any, Any]], Any], pump: Callable[[], None],
                 finish: Callable[[Task, Peer], Awaitable[None]]) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.relay = relay
        self.peers = peers
        self.spawn = spawn
        self.pump = pump      # tasks are back in the queue: dispatch
        self.finish = finish  # a prompt the peer finished while we were away (peerevents)

    async def recover_after(self, peer: Peer) -> None:
        """A peer that stays unreachable (link down) or stalled (failing its health checks)
        for retry_interval loses its prompts to other peers."""
        await asyncio.sleep(self.cfg.retry_interval)
        if peer.linked and peer.health.state != UNHEALTHY:
            return  # it came back: on_link_up reconciles
        reason = peer.link_error if not peer.linked else f"unhealthy: {peer.health.last_error}"
        for task in list(peer.tasks.values()):
            peer.forget(task.prompt_id)
            peer.abandoned.add(task.prompt_id)
            await self.retry_or_fail(task, f"peer {peer.name} was lost ({reason})")

    async def drop_abandoned(self, peer: Peer) -> None:
        """A peer back from the dead may still hold prompts that went elsewhere: take them
        out of its queue (their results would be dropped anyway)."""
        ids, peer.abandoned = list(peer.abandoned), set()
        if not ids:
            return
        try:
            for pid in await peer.withdraw(ids):  # still there: it is running them
                await peer.post_json("/interrupt", {"prompt_id": pid})
            log.info("peer %s: dropped %d prompt(s) that ran elsewhere meanwhile", peer.name, len(ids))
        except PeerError as e:
            peer.abandoned.update(ids)
            log.warning("peer %s: could not drop stale prompts: %s", peer.name, e)

    async def retry_or_fail(self, task: Task, reason: str) -> None:
        if task.attempts > self.cfg.max_retries:
            log.error("giving up on %s after %d attempts: %s", task.prompt_id, task.attempts, reason)
            await self.ledger.failed(task, execution_error(
                task.prompt_id, f"{reason}; gave up after {task.attempts} attempts "
                                f"(queue.max_retries = {self.cfg.max_retries})", "comfylb.PeerLost"))
            return
        log.warning("%s: %s; dispatching it again (attempt %d)", task.prompt_id, reason, task.attempts + 1)
        self.ledger.requeued(task, "lost: " + reason)
        self.pump()

    async def reconcile(self, peer: Peer) -> None:
        """After a reconnect: finish what the peer finished while we were away and take
        back what it no longer has."""
        for task in list(peer.tasks.values()):
            pid = task.prompt_id
            try:
                hist = await peer.get_json(f"/history/{quote(pid, safe='')}")
                running, pending = await peer.held() if not isinstance(hist, dict) or pid not in hist else (set(), set())
            except PeerError:
                return  # the link will drop again and _recover_after takes over
            if peer.tasks.get(pid) is not task:
                continue
            if isinstance(hist, dict) and pid in hist:
                entry: dict = hist[pid] if isinstance(hist[pid], dict) else {}
                status: dict = entry["status"] if isinstance(entry.get("status"), dict) else {}
                messages: list = status["messages"] if isinstance(status.get("messages"), list) else []
                last = messages[-1] if messages and isinstance(messages[-1], list) and len(messages[-1]) == 2 else None
                if last is not None and last[0] in TERMINAL_EVENTS and isinstance(last[1], dict):
                    peer.release(pid)
                    await self.relay.json(task.client_id, last[0], last[1], pid)
                await self.finish(task, peer)
                continue
            if pid not in running | pending:
                peer.forget(pid)
                await self.retry_or_fail(task, f"peer {peer.name} no longer has it")
        self.pump()

    def steal_for(self, idle: list[Peer]) -> None:
        """Nothing waits here but a peer is idle: take back a prompt still waiting in a
        busy peer's own queue, so a fast GPU is not left idle while a slow one holds a
        queue.  Only prompts that have not started are taken, checked with the peer."""
        for thief in idle:
            best = None
            for victim in self.peers.values():
                if victim is thief or victim.running is None:
                    continue
                waiting = [t for t in victim.inflight.values() if t.state == DISPATCHED and not t.stealing
                           and thief.matches(t.targets) and thief.can_run(t.req)]
                if not waiting:
                    continue
                # It starts there only after the running prompt and those ahead of it.
                wait = len(victim.inflight) * (victim.job_time or 1.0)
                if thief.job_time and thief.job_time >= wait:
                    continue
                task = max(waiting, key=lambda t: (t.number, t.seq))  # the one that would wait longest
                if best is None or wait > best[0]:
                    best = (wait, victim, task)
            if best is not None:
                _, victim, task = best
                task.stealing = True
                self.spawn(self._steal(task, victim))

    async def withdraw(self, task: Task, peer: Peer) -> bool:
        """Take a dispatched task that has not started out of its peer's queue.  True when
        it is ours again (no longer counted on the peer); False if it started meanwhile or
        the peer could not be asked."""
        try:
            started = await peer.withdraw([task.prompt_id])
        except PeerError as e:
            log.warning("peer %s: could not take %s out of its queue: %s", peer.name, task.prompt_id, e)
            return False
        if started or task.state != DISPATCHED or peer.tasks.get(task.prompt_id) is not task:
            return False
        peer.forget(task.prompt_id)
        return True

    async def _steal(self, task: Task, victim: Peer) -> None:
        try:
            taken = await self.withdraw(task, victim)
        finally:
            task.stealing = False
        if not taken:
            return  # it started there meanwhile: leave it
        log.info("%s: taken back from %s's queue for an idle peer", task.prompt_id, victim.name)
        self.ledger.requeued(task, "taken back for an idle peer", ran=False)  # not a failure: it never ran
        self.pump()
