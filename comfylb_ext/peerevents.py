"""What peers say, turned into ledger transitions and messages to clients.

A peer's link calls these (peer.PeerListener): its websocket coming up or going down, its
JSON messages and binary frames, and the end of each prompt, whose history entry is then
fetched from the peer and written down in ComfyUI's shape.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Awaitable, Callable, Coroutine
from urllib.parse import quote

from .catalog import Catalog
from .ledger import Ledger
from .metrics import Metrics
from .notify import Notifier
from .outputs import Outputs
from .peer import Peer, PeerError
from .recovery import TERMINAL_EVENTS, Recovery
from .relay import PREVIEW_IMAGE_WITH_METADATA, Relay, frame_prompt, without_asset_ids
from .tasks import Task

log = logging.getLogger(__name__)

# Events the coordinator keeps for a history entry it must write itself.
STATUS_EVENTS = ("execution_start", "execution_cached") + TERMINAL_EVENTS


class PeerEvents:
    def __init__(self, *, ledger: Ledger, relay: Relay, outputs: Outputs, catalog: Catalog, notify: Notifier,
                 metrics: Metrics, recovery: Recovery, spawn: Callable[[Coroutine[Any, Any, Any]], Any],
                 learn: Callable[[Task, float], None], slot_freed: Callable[[], None],
                 drained: Callable[[Peer], Awaitable[None]]) -> None:
        self.ledger = ledger
        self.relay = relay
        self.outputs = outputs
        self.catalog = catalog
        self.notify = notify
        self.metrics = metrics
        self.recovery = recovery
        self.spawn = spawn
        self.learn = learn            # a successful run's time, for the cost model
        self.slot_freed = slot_freed  # a peer has room again: dispatch
        self.drained = drained        # a peer finished a prompt: a removed one may go now
        self.agents: Any = None       # transfers.Agents: whether a peer that links runs an agent

    # -- the link ----------------------------------------------------------------------
    async def on_link_up(self, peer: Peer) -> None:
        self.notify.changed()
        if peer.abandoned:
            self.spawn(self.recovery.drop_abandoned(peer))
        self.spawn(self.catalog.refresh(peer))
        if self.agents is not None:
            self.spawn(self.agents.probe(peer))
        if peer.tasks:
            self.spawn(self.recovery.reconcile(peer))
        self.slot_freed()

    async def on_link_down(self, peer: Peer, reason: str) -> None:
        self.slot_freed()  # nothing to dispatch to it; says so if prompts now wait for no peer
        self.notify.changed()
        self.spawn(self.recovery.recover_after(peer))
        self.spawn(self.notify.status())

    # -- messages ----------------------------------------------------------------------
    async def on_message(self, peer: Peer, msg: dict, relay: bool = True) -> None:
        """`relay`: False for what an edge (edges.py) already relayed to its client."""
        event, data = msg.get("type"), msg.get("data")
        if not isinstance(data, dict) or not isinstance(event, str):
            return
        pid = data.get("prompt_id")
        task = peer.tasks.get(pid) if pid else None
        if task is None:
            return  # the peer's own status broadcasts, or prompts not ours
        if event == "execution_start":
            peer.running, peer.progress = pid, None
            self.ledger.started(task)
        elif event == "progress":
            peer.progress = {k: data.get(k) for k in ("prompt_id", "node", "value", "max")}
            self.notify.changed()
        elif event == "executed":
            data = {**data, "output": without_asset_ids(data.get("output"))}
            self.outputs.record(peer, (data.get("output") or {}), fresh=True)
        if event in STATUS_EVENTS:
            task.messages.append([event, data])
        if event in TERMINAL_EVENTS:
            self._ended_on(peer, task, event)
        if event == "executing" and data.get("node") is None:
            await self.finish(task, peer)
            return
        if relay:
            await self.relay.json(task.client_id, event, data, pid)

    def _ended_on(self, peer: Peer, task: Task, event: str) -> None:
        """Its run is over: the slot is free; what it took teaches the cost model."""
        peer.release(task.prompt_id)
        peer.progress = None
        if task.started_at:
            seconds = time.time() - task.started_at
            success = event == "execution_success"
            peer.record_job(seconds, task.predicted if success else None)
            if success:
                self.learn(task, seconds / (peer.pace or 1.0))
            self.metrics.job(peer.name, seconds)
        if len(self.ledger.queue):
            peer.freed_at = time.perf_counter()  # work waits: the gap until it gets some starts now
        if event != "execution_success":
            peer.jobs_failed += 1
        self.notify.changed()
        self.slot_freed()

    async def on_binary(self, peer: Peer, data: bytes) -> None:
        if len(data) < 4:
            return
        event = int.from_bytes(data[:4], "big")
        payload = data[4:]
        pid = frame_prompt(event, payload, peer.running)
        task = peer.tasks.get(pid) if pid else None
        if task is None:
            return
        if event == PREVIEW_IMAGE_WITH_METADATA:
            await self.relay.preview(task.client_id, payload, task.prompt_id)
        else:
            await self.relay.binary(task.client_id, event, payload, task.prompt_id)

    # -- the end of a prompt -------------------------------------------------------------
    async def finish(self, task: Task, peer: Peer) -> None:
        """The peer is done with the prompt: record history, then tell the client."""
        peer.forget(task.prompt_id)
        entry = None
        try:
            got = await peer.get_json(f"/history/{quote(task.prompt_id, safe='')}", timeout=10)
            entry = got.get(task.prompt_id) if isinstance(got, dict) else None
        except PeerError as e:
            log.warning("peer %s: history of %s unavailable (%s); using relayed events", peer.name, task.prompt_id, e)
        entry = self._entry(task, entry)
        for node_outputs in entry["outputs"].values():  # history: by node, then kind
            if isinstance(node_outputs, dict):
                self.outputs.record(peer, node_outputs)
        await self.drained(peer)
        await self.ledger.finished(task, entry)

    @staticmethod
    def _entry(task: Task, theirs: Any) -> dict:
        """The peer's history entry in ComfyUI's shape, whatever it holds: a peer's odd
        answer must not leave the prompt unfinished."""
        entry = dict(theirs) if isinstance(theirs, dict) else {"outputs": {}, "meta": {}, "status": None}
        prompt = entry.get("prompt")
        outputs = prompt[4] if isinstance(prompt, list) and len(prompt) > 4 else None
        item = task.queue_item()
        item[4] = list(outputs) if isinstance(outputs, list) and outputs else list(task.outputs)
        entry["prompt"] = item
        status = entry.get("status")
        if not isinstance(status, dict) or not isinstance(status.get("messages", []), list) or not status:
            ok = any(m[0] == "execution_success" for m in task.messages)
            entry["status"] = {"status_str": "success" if ok else "error", "completed": ok,
                               "messages": copy.deepcopy(task.messages)}
        if not isinstance(entry.get("outputs"), dict):
            entry["outputs"] = {}
        entry["outputs"] = {nid: without_asset_ids(o) for nid, o in entry["outputs"].items()}
        return entry
