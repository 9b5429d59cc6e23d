"""What happens when a peer is lost, stalls or comes back, and when an idle peer should
take work back from a busy one.  Mixed into the Cluster (dispatcher.py), whose state it
shares; kept apart so the normal path reads on its own."""
from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import quote

from .health import UNHEALTHY
from .peer import Peer, PeerError
from .tasks import DISPATCHED, Task

log = logging.getLogger(__name__)

TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class Recovery:
    async def _recover_after(self, peer: Peer) -> None:
        """A peer that stays unreachable (link down) or stalled (failing its health checks)
        for retry_interval loses its prompts to other peers."""
        await asyncio.sleep(self.cfg.queue.retry_interval)
        if peer.linked and peer.health.state != UNHEALTHY:
            return  # it came back: on_link_up reconciles
        reason = peer.link_error if not peer.linked else f"unhealthy: {peer.health.last_error}"
        for task in list(peer.tasks.values()):
            peer.forget(task.prompt_id)
            peer.abandoned.add(task.prompt_id)
            await self._retry_or_fail(task, f"peer {peer.name} was lost ({reason})")

    async def _drop_abandoned(self, peer: Peer) -> None:
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

    async def _retry_or_fail(self, task: Task, reason: str) -> None:
        if task.attempts > self.cfg.queue.max_retries:
            log.error("giving up on %s after %d attempts: %s", task.prompt_id, task.attempts, reason)
            await self._fail(task, {
                "prompt_id": task.prompt_id, "node_id": None, "node_type": None, "executed": [],
                "exception_message": f"{reason}; gave up after {task.attempts} attempts "
                                     f"(queue.max_retries = {self.cfg.queue.max_retries})",
                "exception_type": "comfylb.PeerLost", "traceback": [], "current_inputs": {},
                "current_outputs": [], "timestamp": _now_ms()})
            return
        log.warning("%s: %s; dispatching it again (attempt %d)", task.prompt_id, reason, task.attempts + 1)
        _outcome(task, "lost: " + reason)
        task.messages.clear()
        self._requeue(task)

    async def _reconcile(self, peer: Peer) -> None:
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
                entry = hist[pid] if isinstance(hist[pid], dict) else {}
                status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
                messages = status.get("messages") if isinstance(status.get("messages"), list) else []
                last = messages[-1] if messages and isinstance(messages[-1], list) and len(messages[-1]) == 2 else None
                if last is not None and last[0] in TERMINAL_EVENTS and isinstance(last[1], dict):
                    peer.release(pid)
                    await self.relay.json(task.client_id, last[0], last[1], pid)
                await self._finish(task, peer)
                continue
            if pid not in running | pending:
                peer.forget(pid)
                await self._retry_or_fail(task, f"peer {peer.name} no longer has it")
        self.pump()

    def _steal_for(self, idle: list[Peer]) -> None:
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

    async def _withdraw(self, task: Task, peer: Peer) -> bool:
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
            taken = await self._withdraw(task, victim)
        finally:
            task.stealing = False
        if not taken:
            return  # it started there meanwhile: leave it
        _outcome(task, "taken back for an idle peer")
        task.attempts -= 1  # not a failure: it never ran
        self.counts["rebalanced"] += 1
        log.info("%s: taken back from %s's queue for an idle peer", task.prompt_id, victim.name)
        self.queue.push(task, keep_seq=True)
        task.peer = None
        self.db.update_task(task)
        self.pump()

def _now_ms() -> int:
    return int(time.time() * 1000)


def _outcome(task: Task, outcome: str) -> None:
    if task.attempt_log and task.attempt_log[-1]["outcome"] is None:
        task.attempt_log[-1]["outcome"] = outcome
