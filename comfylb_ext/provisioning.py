"""Models on demand (provisioning.models: on_demand): a queued prompt that only busy peers
can run, while an idle peer with a ComfyLB agent lacks nothing but model files, gets those
files copied to the idle peer — unless waiting for a busy one is expected to be quicker.
The prompt stays queued either way and goes to whichever peer can take it first.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Coroutine, Iterable

from .catalog import Catalog
from .config import ProvisioningConfig, Provision
from .peer import Peer, PeerError
from .tasks import Task
from .transfers import CopyRefused, Transfers

log = logging.getLogger(__name__)

LOOK_AT = 16            # queued prompts considered per dispatch round that found no peer
RECONSIDER = 5.0        # seconds before a prompt's "wait for a busy peer" is weighed again
GUESS_RUN = 30.0        # seconds a running prompt is guessed to take when nothing predicts it


def lacks_only_models(peer: Peer, task: Task) -> list[tuple[str, str, str]] | None:
    """The model inputs (class, input, file) the peer lacks for the task; None when it
    lacks node types too (copies cannot help: custom nodes are ComfyUI-Manager's)."""
    if peer.caps is None or task.req is None or not task.req.classes <= peer.caps.classes:
        return None
    return sorted((c, n, v) for c, n, v in task.req.models
                  if (c, n) in peer.caps.combos and v not in peer.caps.combos[(c, n)])


def time_until_free(holders: Iterable[Peer], now: float) -> float:
    """Seconds until the least loaded of the peers that have the models frees a slot: what
    its running prompts still need, by their predicted (or usual) run times."""
    waits = []
    for p in holders:
        if p.available and len(p.inflight) < p.cfg.max_queue:
            return 0.0
        left = 0.0
        for t in p.tasks.values():
            run = t.predicted or p.mean_job_time or GUESS_RUN
            left += max(0.0, run - (now - t.started_at)) if t.started_at else run
        waits.append(left)
    return min(waits, default=float("inf"))


class Provisioner:
    def __init__(self, cfg: ProvisioningConfig, peers: dict[str, Peer], catalog: Catalog, transfers: Transfers,
                 spawn: Callable[[Coroutine[Any, Any, Any]], Any], tell: Callable[[Task, str], None]) -> None:
        self.cfg = cfg
        self.peers = peers
        self.catalog = catalog
        self.transfers = transfers
        self.spawn = spawn
        self.tell = tell                       # the prompt's submitter hears why it waits
        self._weighed: dict[str, float] = {}   # prompt id → when a copy for it was last weighed

    def consider(self, queued: Iterable[Task], free: list[Peer]) -> None:
        """Called when a dispatch round found no free peer that can run what is queued."""
        if self.cfg.models != Provision.ON_DEMAND:
            return
        agents = [p for p in free if p.agent and not p.removed]
        if not agents:
            return
        now = time.monotonic()
        for depth, task in enumerate(queued):
            if depth >= LOOK_AT:
                break
            if now - self._weighed.get(task.prompt_id, -RECONSIDER) < RECONSIDER:
                continue
            for peer in agents:
                missing = lacks_only_models(peer, task) if peer.matches(task.targets) else None
                if missing:
                    self._weighed[task.prompt_id] = now
                    self.spawn(self._provision(task, peer, missing))
                    agents.remove(peer)  # one copy plan per idle peer per round
                    break
        if len(self._weighed) > 4 * LOOK_AT:
            self._weighed = {k: v for k, v in self._weighed.items() if now - v < RECONSIDER}

    async def _provision(self, task: Task, dest: Peer, missing: list[tuple[str, str, str]]) -> None:
        for cls, name, value in missing:
            if self.transfers.copying(value):
                continue  # on its way somewhere already: the prompt takes whichever peer is first
            holders = [p for p in self.peers.values() if not p.removed and p.caps is not None
                       and value in p.caps.combos.get((cls, name), ())]
            sources = [p for p in holders if p.agent and p.linked]
            found = await self._find(value, sources)
            if found is None:
                log.info("prompt %s needs %s; no agent peer that has it can send it: it waits for %s",
                         task.prompt_id, value, ", ".join(p.name for p in holders) or "a peer that has it")
                continue
            source, folder, size = found
            copy_s = size / self._rate()
            wait_s = time_until_free([p for p in holders if p.available], time.time())  # down or disabled: no wait ends
            if wait_s <= copy_s:
                log.info("prompt %s: waiting for %s (~%.0f s) is quicker than copying %s to %s (~%.0f s)",
                         task.prompt_id, "/".join(p.name for p in holders), wait_s, value, dest.name, copy_s)
                continue
            try:
                _, new = await self.transfers.start(dest, folder, value, source.name, reason="on_demand")
            except CopyRefused as e:
                log.warning("prompt %s: %s not copied to %s: %s", task.prompt_id, value, dest.name, e)
                continue
            if new:
                log.info("prompt %s: copying %s/%s from %s to idle %s (~%.0f s; the busy peers free up in ~%.0f s)",
                         task.prompt_id, folder, value, source.name, dest.name, copy_s, wait_s)
                self.tell(task, "a model it needs is being copied to an idle peer; the prompt waits in the queue until a "
                               "peer that has it is free")

    async def _find(self, value: str, sources: list[Peer]) -> tuple[Peer, str, int] | None:
        """(a peer to copy from, the model folder the file is in there, its size)."""
        for source in sources:
            listings = await self.catalog.model_listings(source) or {}
            for folder, files in sorted(listings.items()):
                if isinstance(files, list) and value in files:
                    try:
                        status, info = await self.transfers.agents.call(
                            source, "GET", "/lb/agent/file", {"folder": folder, "name": value, "hash": "0"})
                    except PeerError:
                        continue
                    if status == 200 and isinstance(info, dict) and isinstance(info.get("size"), int):
                        return source, folder, info["size"]
        return None

    def _rate(self) -> float:
        """Bytes per second copies have reached here (the last few), else the configured guess."""
        done = [t for t in self.transfers.list if t.state == "done" and t.ended and t.ended > t.started
                and t.done >= 64 << 20][-5:]
        if done:
            return sum(t.done for t in done) / sum(t.ended - t.started for t in done if t.ended)
        return self.cfg.expected_mb_per_s * 1e6
