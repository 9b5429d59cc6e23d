"""The task ledger: the one writer of a task's life.

Every change of a task's state goes through one method per transition (accepted,
dispatched, started, requeued, finished, failed, cancelled, withdrawn), which sets its
timestamps, attempt log and counters, writes the store and tells whoever must hear it
through the injected notifier and relay.  The ledger also owns the live tasks, the
coordinator queue, the recent record, history and numbering.  Which peer runs what is the
dispatcher's business; the ledger only writes down what was decided.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, OrderedDict
from typing import Any, Callable, Iterator

from .errors import execution_interrupted
from .history import History
from .notify import Notifier
from .polls import Polls
from .relay import Relay
from .store import BIG_ROW, StateStore, StoreError
from .tasks import (CANCELLED, DISPATCHED, DONE, FAILED, QUEUED, RUNNING, TERMINAL, Numbering, State, Task,
                    TaskQueue)

log = logging.getLogger(__name__)

RECORD_SIZE = 10000               # finished tasks kept for /lb/tasks
RUNS_KEPT = 10000                 # run times kept for the cost model across restarts
PRUNE_EVERY = 1000                # history entries between prunes of the database
COUNTERS = ("submitted", "completed", "failed", "cancelled", "retried", "rebalanced")

__all__ = ["Ledger", "StoreError", "RECORD_SIZE", "RUNS_KEPT"]


class Ledger:
    def __init__(self, db: StateStore, relay: Relay, notify: Notifier) -> None:
        self.db = db
        self.relay = relay
        self.notify = notify
        self.queue = TaskQueue()
        self.tasks: dict[str, Task] = {}      # every task not yet finished
        self.record: OrderedDict[str, Task] = OrderedDict()  # recent tasks, finished ones too
        self.history = History()
        self.polls: Polls[Task] = Polls()
        self.numbering = Numbering()
        self.counts: Counter[str] = Counter()
        self._arriving: set[str] = set()      # ids of prompts being written down (accepted)

    # -- what it holds ---------------------------------------------------------------
    def remaining(self) -> int:
        """ComfyUI's queue_remaining: every unfinished prompt."""
        return len(self.tasks)

    def queue_depth(self) -> int:
        """Prompts waiting here for a peer."""
        return len(self.queue)

    def running(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.state == RUNNING]

    def live(self, limit: int) -> list[Task]:
        """The first `limit` unfinished tasks: on peers first, then the queue in order.
        Pushed up to ten times a second, so the queue is not sorted whole."""
        on_peers = [t for t in self.tasks.values() if t.state in (RUNNING, DISPATCHED)]
        on_peers.sort(key=lambda t: (t.state != RUNNING, t.number, t.seq))
        queued = self.queue.ordered()
        return on_peers[:limit] + list(itertools.islice(queued, max(0, limit - len(on_peers))))

    def snapshot(self, polled: bool = False) -> tuple[list[Task], list[Task]]:
        """(running, pending), pending in the order they will run; `polled`: GET /queue,
        whose running list keeps a job a poller has not yet seen end (polls.py)."""
        running = self.running()
        if polled:
            running += [t for t in self.polls.lingering() if t.prompt_id not in self.tasks]
        waiting = [t for t in self.tasks.values() if t.state == DISPATCHED]
        waiting.sort(key=lambda t: (t.number, t.seq))
        return running, waiting + list(self.queue)

    def totals(self) -> dict[str, int]:
        return {k: self.counts.get(k, 0) for k in COUNTERS if k != "rebalanced"} | {
            "queued": len(self.queue), "running": len(self.running())}

    # -- start -----------------------------------------------------------------------
    def restore(self, keeps_peer: Callable[[Task], bool]) -> list[Task]:
        """Pick up where the last run stopped: history, numbering and every task not yet
        finished.  Tasks on a peer that `keeps_peer` still knows stay with it (returned,
        to be reconciled with it); the others wait in the queue again."""
        for pid, position, entry in self.db.load_history():
            self.history.restore(pid, position, entry)
        self.numbering.next = self.db.get("number", 0)
        held: list[Task] = []
        requeued = 0
        for task in self.db.load_tasks(finished=RECORD_SIZE):
            self._remember(task)
            if task.state in TERMINAL:
                task.let_go()
                continue
            self.tasks[task.prompt_id] = task
            self.relay.expect(task.client_id, task.prompt_id, (task.number, task.seq))
            if task.state in (DISPATCHED, RUNNING) and keeps_peer(task):
                held.append(task)
            else:
                task.peer, task.state = None, QUEUED
                self.queue.push(task, keep_seq=True)
                requeued += 1
        self.queue.resume_after(max((t.seq for t in self.tasks.values()), default=-1))
        if requeued or held:
            log.info("restored %d queued prompt(s) and %d on peers (to reconcile)", requeued, len(held))
        return held

    # -- transitions -----------------------------------------------------------------
    def taken(self, prompt_id: str) -> bool:
        """The id is a live prompt's, or one being written down now."""
        return prompt_id in self.tasks or prompt_id in self._arriving

    async def accepted(self, task: Task) -> None:
        """A new prompt, acknowledged only once it is on disk: StoreError if it is not.
        Until then it is nowhere but in the database's queue, so nothing runs it yet."""
        self._arriving.add(task.prompt_id)
        task.seq = self.queue.next_seq()
        try:
            await self.db.add_task(task)
        finally:
            self._arriving.discard(task.prompt_id)
        self.queue.push(task, keep_seq=True)
        self.tasks[task.prompt_id] = task
        self._remember(task)
        self.relay.expect(task.client_id, task.prompt_id, (task.number, task.seq))
        self.db.put("number", self.numbering.next)
        self.counts["submitted"] += 1
        self.notify.changed()
        self.notify.queue_changed()

    async def withdrawn(self, task: Task) -> None:
        """Refused while its submitter still waited for the answer: it never existed."""
        self.queue.remove(task.prompt_id)
        self.tasks.pop(task.prompt_id, None)
        self.record.pop(task.prompt_id, None)
        self.db.delete_task(task.prompt_id)
        self.counts["submitted"] -= 1
        self.notify.changed()
        await self.relay.end(task.client_id, task.prompt_id)
        await self.notify.status()

    def dispatched(self, task: Task, peer: str, predicted: float | None, via: str | None = None) -> None:
        """`via`: the edge whose client id it is sent under (edges.py), kept with the attempt."""
        self.queue.remove(task.prompt_id)
        task.state, task.peer = DISPATCHED, peer
        task.predicted = predicted
        task.attempts += 1
        task.dispatched_at = time.time()
        task.attempt_log.append({"peer": peer, "at": task.dispatched_at, "outcome": None} | ({"via": via} if via else {}))
        self.db.update_task(task)
        self.notify.changed()

    def started(self, task: Task) -> None:
        task.state, task.started_at = RUNNING, time.time()
        self.db.update_task(task)
        self.notify.changed()
        self.notify.queue_changed()

    def requeued(self, task: Task, outcome: str | None = None, *, ran: bool = True) -> None:
        """Back to the queue, in its old place.  `ran`: the attempt counts (the peer took
        it and lost it); False: it never started (taken back for an idle peer)."""
        if outcome is not None:
            _outcome(task, outcome)
        if ran:
            self.counts["retried"] += 1
        else:
            task.attempts -= 1
            self.counts["rebalanced"] += 1
        task.messages.clear()  # the next attempt's history is its own
        task.peer, task.state = None, QUEUED
        self.db.update_task(task)
        self.queue.push(task, keep_seq=True)
        self.notify.changed()

    async def finished(self, task: Task, entry: dict) -> None:
        """Its peer is done with it; `entry` is the history entry, in ComfyUI's shape."""
        status = entry["status"]
        ok = status.get("status_str") == "success"
        interrupted = any(isinstance(m, list) and m and m[0] == "execution_interrupted"
                          for m in status.get("messages") or [])
        state = DONE if ok else CANCELLED if interrupted else FAILED
        self._end(task, state, str(state), entry)
        self.counts["completed" if ok else str(state)] += 1
        await self._said_end(task)

    async def failed(self, task: Task, error: dict) -> None:
        """Ended without a peer finishing it: `error` (errors.execution_error) to its
        client and into history."""
        task.error = error["exception_message"]
        entry = {"prompt": task.queue_item(), "outputs": {},
                 "status": {"status_str": "error", "completed": False, "messages": [["execution_error", error]]},
                 "meta": {}}
        self._end(task, FAILED, f"failed: {task.error}", entry)
        self.counts["failed"] += 1
        await self.relay.json(task.client_id, "execution_error", error, task.prompt_id)
        await self._said_end(task)

    async def cancelled(self, task: Task, tell: bool = False) -> None:
        """It never runs (or stopped before it started).  `tell`: its client hears what
        ComfyUI says of an interrupted prompt; else it is dropped silently, as ComfyUI
        drops a deleted queue item."""
        self.queue.remove(task.prompt_id)
        self.polls.forget(task.prompt_id)
        self._end(task, CANCELLED, str(CANCELLED), None)
        self.counts["cancelled"] += 1
        if tell:
            await self.relay.json(task.client_id, "execution_interrupted", execution_interrupted(task.prompt_id),
                                  task.prompt_id)
            await self._said_end(task)
        else:
            await self.relay.end(task.client_id, task.prompt_id)

    def _end(self, task: Task, state: State, outcome: str, entry: dict | None) -> None:
        """The terminal step every ending shares."""
        task.state, task.finished_at = state, time.time()
        _outcome(task, outcome)
        if entry is not None:
            # an edge's id is the cluster's business, not its clients'
            entry["comfylb"] = {"attempts": [{k: v for k, v in a.items() if k != "via"} for a in task.attempt_log]}
            self._add_history(task, entry)
        self.tasks.pop(task.prompt_id, None)
        task.drop_secrets()
        self.db.update_task(task)
        # the history entry holds its prompt; a job still listed for its poller keeps it
        task.let_go(keep_prompt=entry is not None and task in self.polls.lingering())
        self.notify.changed()

    async def _said_end(self, task: Task) -> None:
        await self.notify.status()
        await self.relay.json(task.client_id, "executing", {"node": None, "prompt_id": task.prompt_id},
                              task.prompt_id)
        await self.relay.end(task.client_id, task.prompt_id)

    def _remember(self, task: Task) -> None:
        self.record[task.prompt_id] = task
        self.record.move_to_end(task.prompt_id)
        while len(self.record) > RECORD_SIZE:
            old_id, old = next(iter(self.record.items()))
            if old.state not in TERMINAL:
                break
            del self.record[old_id]

    # -- history -----------------------------------------------------------------------
    def _add_history(self, task: Task, entry: dict) -> None:
        entry = self.history.add(task.prompt_id, entry)
        if task.prompt_id in self.tasks:
            self.polls.ended(task.prompt_id, task)
        self.db.add_history(task.prompt_id, entry["prompt"][0], entry, big=task.size > BIG_ROW)
        if len(self.history) % PRUNE_EVERY == 0:
            self.db.prune_history(self.history.max_size)
            self.db.prune_tasks(RECORD_SIZE)
            self.db.prune_runs(RUNS_KEPT)

    def history_item(self, prompt_id: str) -> dict | None:
        """GET /history/{id}; a miss while the job is live marks it as polled (polls.py)."""
        entry = self.history.get(prompt_id)
        if entry is not None:
            self.polls.forget(prompt_id)
        elif prompt_id in self.tasks:
            self.polls.missed(prompt_id)
        return entry

    def delete_history(self, prompt_ids: list[str]) -> None:
        for pid in prompt_ids:
            self.history.delete(pid)
            self.polls.forget(pid)
        self.db.delete_history(prompt_ids)

    def clear_history(self) -> None:
        self.history.clear()
        self.polls = Polls()
        self.db.clear_history()

    def history_rows(self) -> Iterator[tuple[str, int, dict]]:
        """(prompt id, position, entry) of every entry, to write the database anew."""
        for i, (pid, e) in enumerate(self.history.items().items()):
            yield pid, e["prompt"][0] if e.get("prompt") else i, e

    async def verdict(self, task: Task, wait: float) -> tuple[int, Any] | None:
        """POST /prompt of a task a peer took at once: the peer's own answer when it
        refused (a custom node's validation that only it can judge), else None.  Called
        right after submit(), before the peer is asked."""
        if task.state != DISPATCHED or task.attempts != 1:
            return None  # it waits here: the answer cannot wait for a peer
        task.verdict = asyncio.get_running_loop().create_future()
        try:
            status, body = await asyncio.wait_for(asyncio.shield(task.verdict), wait)
        except asyncio.TimeoutError:
            status = body = None
        task.verdict = None  # from now on a refusal fails it as usual
        if status == 400 and isinstance(body, dict) and "error" in body:
            return status, {"error": body["error"], "node_errors": body.get("node_errors") or {}}
        return None


def _outcome(task: Task, outcome: str) -> None:
    if task.attempt_log and task.attempt_log[-1]["outcome"] is None:
        task.attempt_log[-1]["outcome"] = outcome
