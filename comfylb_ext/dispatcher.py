"""The coordinator: moves tasks from the queue to peers and their events back to clients.

Event-driven: every change that can free capacity (a peer's terminal event, a peer
linking or turning healthy, a new task) calls `pump()`, which hands out work at once.
Nothing polls between "a peer is free" and "the peer has work".
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
import uuid
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import aiohttp

from . import capability, replacements, routing, validation
from .cost import CostModel
from .config import ORDERS, STRATEGIES, BackendConfig, Config
from .health import HealthChecker
from .history import History
from .jobs import is_canonical_uuid
from .metrics import Metrics
from .polls import Polls
from .recovery import TERMINAL_EVENTS, Recovery, _now_ms, _outcome
from .peer import SMALL_BODY, Peer, PeerError, clean_system_stats
from .relay import PREVIEW_IMAGE_WITH_METADATA, Hub, Relay, parse_preview, without_asset_ids
from .scheduler import SchedulerState, longest_first, pick
from .store import Snapshot, Store, StoreError
from .tasks import (CANCELLED, DISPATCHED, DONE, FAILED, QUEUED, RUNNING, TERMINAL, Numbering, Task,
                    TaskQueue)
from .uploads import InputStore, file_ref
from .outputs import Outputs, ViewCache

log = logging.getLogger(__name__)

STATUS_EVENT = "comfylb.status"   # the custom websocket event that carries live state
PUSH_EVERY = 0.1                  # seconds: at most this many pushes of it per second
SNAPSHOT_TASKS = 50               # queued/running tasks included in a push
SCHEDULER_CHOICES = {"strategy": STRATEGIES, "order": ORDERS}  # what /lb/scheduler/{key}/{value} may set
RECORD_SIZE = 10000               # finished tasks kept for /lb/tasks
RUNS_KEPT = 10000                 # run times kept for the cost model across restarts
OBJECT_INFO_EVERY = 12            # health checks between refreshes of a peer's /object_info
PUMP_SCAN = 1000                  # queued tasks looked at per dispatch for one a free peer may run
AFFINITY_LOOKAHEAD = 64           # queued tasks a warm peer looks through for one using its models
ORDER_WINDOW = 64                 # longest_first: queued tasks reordered; also the most times one is overtaken
PREFETCH_MAX = 32 << 20           # outputs larger than this are relayed on demand, not copied ahead
KEPT_CHECK_EVERY = 0.5            # seconds between looks for returned clients with results waiting
ITSELF = ("this address is this ComfyLB itself, not a peer: list the other ComfyUI instances under backends "
          "(127.0.0.1:8188 is ComfyUI's own default address)")
STORE_CHECK_EVERY = 2.0           # seconds between checks that the state database is still there and writable
# Events the coordinator keeps for a history entry it must write itself.
_STATUS_EVENTS = ("execution_start", "execution_cached") + TERMINAL_EVENTS



class Cluster(Recovery):
    def __init__(self, cfg: Config, hub: Hub, store: InputStore, db: Store | None = None) -> None:
        self.cfg = cfg
        self.db = db or Store(None)
        self.relay = Relay(hub, cfg.server.ordered_delivery)
        self.store = store
        self.peers: dict[str, Peer] = {}
        self.queue = TaskQueue()
        self.tasks: dict[str, Task] = {}      # every task not yet finished
        self.record: OrderedDict[str, Task] = OrderedDict()  # recent tasks, finished ones too
        self.history = History()
        self.polls: Polls[Task] = Polls()
        self.numbering = Numbering()
        self.sched = SchedulerState(cfg.scheduler.strategy, cfg.scheduler.prefer_idle, cfg.scheduler.affinity,
                                    cfg.scheduler.order)
        self.costs = CostModel()
        # Stable across restarts: prompts already on a peer keep sending their events to us.
        self.instance_id = uuid.uuid4().hex  # this process, as its answers say (peer.INSTANCE_HEADER)
        self.client_id = self.db.get("client_id") or "comfylb-" + uuid.uuid4().hex
        self.db.put("client_id", self.client_id)
        self.counts: Counter[str] = Counter()
        self.started_at = time.time()
        self._picks = itertools.count()
        self._catalog: dict[str, dict] | None = None
        self.runtime_peers: dict[str, BackendConfig] = {}  # added by POST /lb/backends, kept in the database
        self._waiting: str | None = None  # why prompts wait, as last said
        self._replacements: dict[str, list[dict]] = {}
        self._bg: set[asyncio.Task] = set()
        self.session: aiohttp.ClientSession | None = None
        self.health = HealthChecker(cfg.health_check, lambda: self.peers.values(), self.check_peer)
        self.hub = hub
        self._push_at: float | None = None
        self.state_changed = asyncio.Event()  # set, then replaced, on every changed()
        self.metrics = Metrics(self)
        cache = ViewCache(Path(cfg.storage.dir) / "view-cache" if self.db.path != ":memory:" else None,
                          cfg.storage.view_cache_mb << 20)
        self.outputs = Outputs(self.db, cache, PREFETCH_MAX, cfg.storage.prefetch_outputs, self.spawn, self.changed)

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=64, ttl_dns_cache=300),
            auto_decompress=False, read_bufsize=1 << 20)
        for b in self.cfg.backends:
            self.add_peer(b)
        for b in self.db.load_peers():
            if not self.cfg.storage.keep_runtime_peers:
                self.db.delete_peer(b.name)
                log.info("peer %s, added at runtime, forgotten (storage.keep_runtime_peers is false)", b.name)
            elif b.name not in self.peers:
                self.runtime_peers[b.name] = b
                self.add_peer(b)
        self._restore()
        self.health.start()
        self.spawn(self._keep_state_on_disk())
        self.spawn(self._deliver_kept())
        log.info("coordinator up with %d peer(s), strategy %s%s", len(self.peers), self.sched.strategy,
                 f"; {len(self.runtime_peers)} of them added at runtime ({', '.join(self.runtime_peers)}: kept in "
                 "the state database, not the config; DELETE /lb/backends/{name} removes one for good)"
                 if self.runtime_peers else "")

    def _restore(self) -> None:
        """Pick up where the last run stopped: history, counters, files, and every task
        not yet finished (queued ones wait again; those on a peer are reconciled with it
        as soon as it links)."""
        for pid, position, entry in self.db.load_history():
            self.history.restore(pid, position, entry)
        for shape, seconds in self.db.load_runs(keep=RUNS_KEPT):
            self.costs.observe(shape, seconds)
        self.numbering.next = self.db.get("number", 0)
        requeued = held = 0
        for task in self.db.load_tasks(finished=RECORD_SIZE):
            self._remember(task)
            if task.state in TERMINAL:
                task.let_go()
                continue
            task.req = capability.requirements(task.prompt)
            self.tasks[task.prompt_id] = task
            self.relay.expect(task.client_id, task.prompt_id, (task.number, task.seq))
            peer = self.peers.get(task.peer) if task.state in (DISPATCHED, RUNNING) else None
            if peer is not None:
                peer.assign(task)
                held += 1
            else:
                task.peer = None
                self.queue.push(task, keep_seq=True)
                requeued += 1
        self.queue.resume_after(max((t.seq for t in self.tasks.values()), default=-1))
        if requeued or held:
            log.info("restored %d queued prompt(s) and %d on peers (to reconcile)", requeued, held)
        self.pump()

    async def _keep_state_on_disk(self) -> None:
        """A write that failed (a full disk) or a database file deleted under us: the whole
        state, which memory still holds, is written again as soon as the disk takes it."""
        while True:
            await asyncio.sleep(STORE_CHECK_EVERY)
            if self.db.needs_rebuild():
                self.db.rebuild(self.state_snapshot())

    async def _deliver_kept(self) -> None:
        """Results kept for clients that were away reach them once they are back (a host
        that tells when a socket connects delivers them at once too)."""
        while True:
            await asyncio.sleep(KEPT_CHECK_EVERY)
            if self.relay.mailbox:
                await self.relay.deliver_kept()

    def state_snapshot(self) -> Snapshot:
        return Snapshot(
            meta={"client_id": self.client_id, "number": self.numbering.next},
            peers=list(self.runtime_peers.values()), tasks=list(self.record.values()),
            history=[(pid, e["prompt"][0] if e.get("prompt") else i, e) for i, (pid, e) in
                     enumerate(self.history.items().items())],
            files=dict(self.outputs.holders), runs=list(self.costs.runs()))

    async def stop(self) -> None:
        await self.health.stop()
        self.db.close()
        await asyncio.gather(*(p.stop() for p in self.peers.values()), return_exceptions=True)
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        if self.session:
            await self.session.close()

    def spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        t.add_done_callback(_log_crash)
        return t

    # -- live updates ------------------------------------------------------------------
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

    def snapshot(self) -> dict:
        """Everything the panel shows, in one message."""
        return {"stats": self.stats(), "backends": [p.describe() for p in self.peers.values()],
                "scheduler": self.scheduler_info(),
                "queue": [t.summary() for t in self.live_tasks(SNAPSHOT_TASKS)]}

    def stats(self) -> dict:
        return {
            "uptime": time.time() - self.started_at,
            "totals": {k: self.counts.get(k, 0) for k in ("submitted", "completed", "failed", "cancelled", "retried")}
            | {"queued": len(self.queue), "running": sum(1 for t in self.tasks.values() if t.state == RUNNING)},
            "queue_depth": len(self.queue),
            "in_flight": sum(len(p.inflight) for p in self.peers.values()),
            "backends": {p.name: {"in_flight": len(p.inflight), "jobs_done": p.jobs_done, "jobs_failed": p.jobs_failed,
                                  "mean_job_time": p.mean_job_time} for p in self.peers.values()},
            "storage": {"ok": self.db.problem is None, "problem": self.db.problem},
            "waiting": self._waiting,
        }

    def scheduler_info(self) -> dict:
        return {"strategy": self.sched.strategy, "prefer_idle": self.sched.prefer_idle,
                "affinity": self.sched.affinity, "order": self.sched.order, "strategies": list(STRATEGIES),
                "orders": list(ORDERS)}

    def live_tasks(self, limit: int) -> list[Task]:
        """The first `limit` unfinished tasks: on peers first, then the queue in order.
        Pushed up to ten times a second, so the queue is not sorted whole."""
        running = [t for t in self.tasks.values() if t.state in (RUNNING, DISPATCHED)]
        running.sort(key=lambda t: (t.state != RUNNING, t.number, t.seq))
        return running[:limit] + list(itertools.islice(self.queue.ordered(), max(0, limit - len(running))))

    def _remember(self, task: Task) -> None:
        self.record[task.prompt_id] = task
        self.record.move_to_end(task.prompt_id)
        while len(self.record) > RECORD_SIZE:
            old_id, old = next(iter(self.record.items()))
            if old.state not in TERMINAL:
                break
            del self.record[old_id]

    # -- peers at runtime --------------------------------------------------------------
    def add_peer(self, b: BackendConfig, persist: bool = False) -> Peer:
        """persist: added at runtime (POST /lb/backends), so it is still there after a restart."""
        assert self.session is not None
        if persist:
            self.db.save_peer(b)
            self.runtime_peers[b.name] = b
        peer = Peer(b, self.session, self.client_id, self, self.cfg.health_check.timeout * 10)
        peer.source = "runtime" if b.name in self.runtime_peers else "config"
        self.peers[b.name] = peer
        peer.start()
        self.spawn(self.check_peer(peer))
        log.info("peer %s added (%s)", b.name, b.url)
        self.changed()
        return peer

    async def remove_peer(self, name: str) -> None:
        """No new work; prompts already there finish and are still relayed."""
        peer = self.peers[name]
        peer.removed = True
        self.db.delete_peer(name)
        self.runtime_peers.pop(name, None)
        log.info("peer %s removed%s", name, f"; {len(peer.tasks)} prompt(s) finish there first" if peer.tasks else "")
        self._catalog = None
        self.changed()
        await self._retire_if_idle(peer)

    async def _retire_if_idle(self, peer: Peer) -> None:
        if peer.removed and not peer.tasks and self.peers.get(peer.name) is peer:
            del self.peers[peer.name]
            self.spawn(peer.stop())  # not awaited: we may be running inside its own link task
            self.changed()

    def set_enabled(self, name: str, enabled: bool) -> None:
        peer = self.peers[name]
        if peer.enabled != enabled:
            peer.enabled = enabled
            log.info("peer %s %s", name, "enabled" if enabled else "disabled (running prompts finish)")
            self.changed()
            self.pump()

    def set_scheduler(self, key: str, value: str) -> None:
        """Switch the strategy or the dispatch order at runtime."""
        if value not in SCHEDULER_CHOICES[key]:
            raise ValueError(value)
        if getattr(self.sched, key) != value:
            log.info("%s: %s -> %s", key, getattr(self.sched, key), value)
            setattr(self.sched, key, value)
            if key == "strategy":
                self.sched.cursor = 0  # round_robin starts over
            self.changed()

    # -- health --------------------------------------------------------------------
    async def check_peer(self, peer: Peer) -> None:
        try:
            stats = await peer.get_json("/system_stats", timeout=self.cfg.health_check.timeout, max_size=SMALL_BODY)
            ok, error = isinstance(stats, dict), None
            if ok:
                peer.system_stats = clean_system_stats(stats)
        except PeerError as e:
            ok, error = False, str(e)
        if peer.answered_by == self.instance_id:
            ok, error = False, ITSELF
            self.spawn(peer.stop())  # no websocket to ourselves; it stays listed, refused, with the reason
        peer.checks += 1
        if ok and peer.linked and peer.checks % OBJECT_INFO_EVERY == 0:
            self.spawn(self.refresh_object_info(peer))  # nodes or models may have been added
        if peer.health.record(ok, self.cfg.health_check, error):
            if ok:
                log.info("peer %s: healthy after %d good check(s)", peer.name, peer.health.successes)
            else:
                log.warning("peer %s: unhealthy after %d failed check(s): %s", peer.name, peer.health.failures, error)
                if peer.tasks:
                    self.spawn(self._recover_after(peer))
            if ok and peer.abandoned:
                self.spawn(self._drop_abandoned(peer))
            self.changed()
            self.pump()

    # -- submission ----------------------------------------------------------------
    def catalog(self) -> dict[str, dict] | None:
        """Union of the peers' node definitions (None until a peer has answered)."""
        if self._catalog is None:
            infos = [p.object_info for p in self.peers.values() if p.object_info and not p.removed]
            if not infos:
                return None
            self._catalog = capability.merge_catalogs(infos)
            self._replacements = replacements.merge(p.replacements for p in self.peers.values()
                                                    if p.object_info and not p.removed)
        return self._catalog

    def node_replacements(self) -> dict[str, list[dict]]:
        """The peers' node replacements as one map (GET /node_replacements)."""
        self.catalog()
        return self._replacements

    def submit(self, data: Any) -> tuple[int, dict]:
        """POST /prompt: (status, body) in ComfyUI's shapes."""
        if not isinstance(data, dict):
            return 400, validation.error_body(validation._err(
                "invalid_prompt", "Request body must be a JSON object.", type(data).__name__))
        try:
            number = self.numbering.assign(data.get("number"), data.get("front"))
        except (TypeError, ValueError):
            return 400, validation.error_body(validation._err(
                "invalid_prompt", "number must be a number", repr(data.get("number"))))
        if "prompt" not in data:
            return 400, validation.error_body(validation._err("no_prompt", "No prompt provided", "No prompt provided"))
        prompt = data["prompt"]
        prompt_id = data.get("prompt_id")
        if prompt_id is None:
            prompt_id = str(uuid.uuid4())
        elif not is_canonical_uuid(prompt_id):
            # today's ComfyUI refuses anything else, so a peer would refuse it later
            return 400, validation.error_body(validation._err(
                "invalid_prompt_id", "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                "omit it to let the server generate one"))
        partial = data.get("partial_execution_targets")
        if partial is not None and not (isinstance(partial, list) and all(isinstance(x, str) for x in partial)):
            return 400, validation.error_body(validation._err(
                "invalid_prompt", "partial_execution_targets must be a list of node ids", repr(partial)[:200]))
        catalog = self.catalog()
        if isinstance(prompt, dict):
            if catalog is not None and self._replacements:
                # as today's ComfyUI does before validating; peers get the replaced nodes
                prompt = replacements.apply(prompt, self._replacements, catalog)
            prompt, targets, rules = routing.extract(prompt)
            refusal = routing.unroutable(rules, {p.name: p.cfg.tags for p in self.peers.values() if not p.removed})
            if refusal is not None:
                return 400, validation.error_body(*refusal)
        else:
            targets = None
        ok, error, outputs, node_errors = validation.validate(prompt, catalog, partial, self._known_file)
        if not ok:
            return 400, validation.error_body(error, node_errors)
        req = capability.requirements(prompt)
        known = {p.name: p.caps for p in self.peers.values()
                 if not p.removed and p.matches(targets) and p.caps is not None}
        if len(known) == sum(1 for p in self.peers.values() if not p.removed and p.matches(targets)):
            refusal = capability.unrunnable(req, known)
            if refusal is not None:
                return 400, validation.error_body(*refusal)
        if prompt_id in self.tasks:
            return 409, validation.error_body(validation._err(
                "duplicate_prompt_id", "A prompt with this prompt_id is already pending or running.", prompt_id))
        if len(self.queue) >= self.cfg.queue.max_size:
            return 503, validation.error_body(validation._err(
                "queue_full", "The queue is full; try again later.",
                f"{len(self.queue)} prompts are waiting (queue.max_size)"))
        extra = data.get("extra_data") or {}
        if not isinstance(extra, dict):
            return 400, validation.error_body(validation._err("invalid_prompt", "extra_data must be an object", ""))
        extra = dict(extra)
        extra["create_time"] = int(time.time() * 1000)  # as ComfyUI: the jobs API sorts and the UI validates by it
        client_id = data.get("client_id")
        if client_id is not None:
            extra["client_id"] = client_id
        task = Task(prompt_id, number, prompt, extra, outputs,
                    client_id=str(client_id) if client_id else None, partial_targets=partial, targets=targets)
        task.req = req
        self.queue.push(task)
        try:
            self.db.add_task(task)  # acknowledged only once it is on disk
        except StoreError as e:
            self.queue.remove(prompt_id)
            return 503, validation.error_body(validation._err(
                "storage_unavailable", "The coordinator cannot store the prompt; try again later.", str(e)))
        self.tasks[prompt_id] = task
        self._remember(task)
        self.relay.expect(task.client_id, prompt_id, (task.number, task.seq))
        self.db.put("number", self.numbering.next)
        self.counts["submitted"] += 1
        self.changed()
        self.pump()
        self.spawn(self.broadcast_status())
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def _known_file(self, value: str) -> bool:
        """A file a prompt names is here (uploaded) or on a peer (an output it made)."""
        ref = file_ref(value)
        return ref is not None and (self.store.lookup(*ref) is not None or self.outputs.holder(*ref) is not None)

    # -- dispatch ------------------------------------------------------------------
    def pump(self) -> None:
        self._pump()
        reason = self.waiting_reason()
        if reason != self._waiting:  # said once per change, not at every event
            self._waiting = reason
            if reason:
                log.warning("%d prompt(s) wait: %s", len(self.queue), reason)
            else:
                log.info("prompts are being dispatched again")
            self.changed()

    def waiting_reason(self) -> str | None:
        """Why queued prompts wait although they could run, for people: None when they
        only wait their turn on busy peers."""
        if not len(self.queue) or any(p.available for p in self.peers.values()):
            return None
        peers = [p for p in self.peers.values() if not p.removed]
        if not peers:
            return "no peer is configured (add one under backends in the config, or POST /lb/backends)"
        return "no peer is available: " + "; ".join(
            f"{p.name} is {p.status}" + (f" ({p.health.last_error or p.link_error})"
                                         if p.status not in ("disabled", "healthy") and (p.health.last_error or p.link_error) else "")
            for p in peers)

    def _pump(self) -> None:
        """Hand queued tasks to peers with room, best first, until one side runs out.

        A task that only some peers may run (a routing rule) does not hold up the tasks
        behind it: they may take a peer it cannot use."""
        while True:
            # longest_first decides each peer's next prompt when the peer is free: a prompt
            # sent ahead to a busy peer's queue starts later than its place in the order
            cap = 1 if self.sched.order == "longest_first" else None
            peers = [p for p in self.peers.values() if p.view(cap).has_room]
            if not peers:
                return
            if not len(self.queue):
                self._steal_for([p for p in peers if not p.inflight])
                return
            window, order = self._dispatch_order()
            for depth, task in enumerate(order):
                if depth >= PUMP_SCAN:
                    return
                views = [p.view(cap) for p in self.peers.values() if p.matches(task.targets) and p.can_run(task.req)]
                chosen = pick(views, self.sched, task.req.model_key if task.req else frozenset(),
                              task.req.cache_keys if task.req else frozenset())
                if chosen is not None:
                    break
            else:
                return
            peer = self.peers[chosen.name]
            task = self._warm_alternative(task, peer)
            for ahead in itertools.takewhile(lambda t: t is not task, window):
                ahead.overtaken += 1
            self.queue.remove(task.prompt_id)
            peer.models = task.req.model_key if task.req else frozenset()
            peer.cached = task.req.cache_keys if task.req else frozenset()
            if peer.freed_at is not None:
                self.metrics.gap(peer.name, time.perf_counter() - peer.freed_at)
                peer.freed_at = None
            peer.last_pick = next(self._picks)
            task.state, task.peer = DISPATCHED, peer.name
            task.predicted = self.costs.predict(task.shape)
            task.attempts += 1
            task.dispatched_at = time.time()
            task.attempt_log.append({"peer": peer.name, "at": task.dispatched_at, "outcome": None})
            peer.assign(task)
            self.db.update_task(task)
            self.changed()
            self.spawn(self._send(task, peer))

    def _dispatch_order(self) -> tuple[list[Task], Iterator[Task]]:
        """Queued tasks in the order to dispatch them, and (with longest_first) the
        window of them that was reordered, in queue order."""
        queued = self.queue.ordered()
        if self.sched.order != "longest_first":
            return [], queued
        window = list(itertools.islice(queued, ORDER_WINDOW))
        order = longest_first([(t.number, self.costs.predict(t.shape), t.overtaken) for t in window], ORDER_WINDOW)
        return window, itertools.chain((window[i] for i in order), queued)

    def _warm_alternative(self, task: Task, peer: Peer) -> Task:
        """Model affinity from the peer's side: a peer about to load other models takes a
        queued task that uses the models it already has instead — but only when another
        peer holds `task`'s models and will take it, so nothing starves or waits for a
        load that would happen anyway."""
        if not (self.sched.affinity and peer.models and task.req and task.req.model_key
                and task.req.model_key != peer.models):
            return task
        if not any(p is not peer and p.models == task.req.model_key and p.available and p.can_run(task.req)
                   for p in self.peers.values()):
            return task
        for depth, other in enumerate(self.queue.ordered()):
            if depth >= AFFINITY_LOOKAHEAD:
                break
            if (other.req and other.req.model_key == peer.models and peer.matches(other.targets)
                    and peer.can_run(other.req)):
                return other
        return task

    def _payload(self, task: Task, peer: Peer) -> dict:
        body = {"prompt": routing.per_peer_outputs(task.prompt, peer.name),
                "client_id": self.client_id, "prompt_id": task.prompt_id,
                "extra_data": {k: v for k, v in task.extra_data.items() if k != "client_id"}}
        if task.partial_targets is not None:
            body["partial_execution_targets"] = task.partial_targets
        return body

    async def _send(self, task: Task, peer: Peer) -> None:
        try:
            for f in self.store.references(task.prompt):
                await peer.deliver(f, self.store.path_of(f))
            status, body = await peer.post_json("/prompt", self._payload(task, peer))
        except PeerError as e:
            task.tell_verdict(None, None)
            if peer.tasks.get(task.prompt_id) is task and task.state == DISPATCHED:
                log.warning("peer %s: could not take %s (%s); back to the queue", peer.name, task.prompt_id, e)
                peer.forget(task.prompt_id)
                self._requeue(task)
            return
        awaited = task.tell_verdict(status, body)
        if status == 200 or status == 409:
            return  # 409: today's ComfyUI already holds this id, from an attempt whose answer we lost
        if peer.tasks.get(task.prompt_id) is not task:
            return
        log.info("peer %s rejected %s: HTTP %s", peer.name, task.prompt_id, status)
        self.spawn(self.refresh_object_info(peer))  # what it has may have changed
        peer.forget(task.prompt_id)
        if awaited and status == 400:
            await self._unsubmit(task)  # its submitter gets the peer's 400 instead of a 200
        else:
            await self._fail(task, _rejection_message(task, peer.name, status, body))
        self.pump()

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

    async def _unsubmit(self, task: Task) -> None:
        """A task refused while its submitter still waits: it never existed."""
        self.tasks.pop(task.prompt_id, None)
        self.record.pop(task.prompt_id, None)
        self.db.delete_task(task.prompt_id)
        self.counts["submitted"] -= 1
        self.changed()
        await self.relay.end(task.client_id, task.prompt_id)
        await self.broadcast_status()

    def _requeue(self, task: Task) -> None:
        task.peer = None
        task.state = QUEUED
        self.db.update_task(task)
        self.counts["retried"] += 1
        self.queue.push(task, keep_seq=True)
        self.pump()

    async def _fail(self, task: Task, error: dict) -> None:
        """End a task that no peer ran: execution_error to its client and into history."""
        # the newest web UI drops the whole job list if one error names no node as a string
        error = {**error, "node_id": error.get("node_id") or "", "node_type": error.get("node_type") or ""}
        task.state, task.finished_at = FAILED, time.time()
        task.error = error.get("exception_message")
        _outcome(task, "failed: " + str(task.error))
        entry = {"prompt": task.queue_item(), "outputs": {},
                 "status": {"status_str": "error", "completed": False, "messages": [["execution_error", error]]},
                 "meta": {}, "comfylb": {"attempts": task.attempt_log}}
        self._add_history(task.prompt_id, entry)
        self.tasks.pop(task.prompt_id, None)
        task.drop_secrets()
        self.db.update_task(task)
        task.let_go(keep_prompt=task in self.polls.lingering())
        self.counts["failed"] += 1
        self.changed()
        await self.relay.json(task.client_id, "execution_error", error, task.prompt_id)
        await self.broadcast_status()
        await self.relay.json(task.client_id, "executing", {"node": None, "prompt_id": task.prompt_id}, task.prompt_id)
        await self.relay.end(task.client_id, task.prompt_id)

    # -- peer events ---------------------------------------------------------------
    async def on_link_up(self, peer: Peer) -> None:
        self.changed()
        if peer.abandoned:
            self.spawn(self._drop_abandoned(peer))
        self.spawn(self.refresh_object_info(peer))
        if peer.tasks:
            self.spawn(self._reconcile(peer))
        self.pump()

    async def on_link_down(self, peer: Peer, reason: str) -> None:
        self.pump()  # nothing to dispatch to it; says so if prompts now wait for no peer
        self.changed()
        self.spawn(self._recover_after(peer))
        self.spawn(self.broadcast_status())

    async def refresh_object_info(self, peer: Peer) -> None:
        """What nodes and models the peer has, and which deprecated nodes it replaces."""
        try:
            info = await peer.get_json("/object_info", timeout=60)
        except PeerError as e:
            log.warning("peer %s: no /object_info: %s", peer.name, e)
            return
        problem = capability.object_info_problem(info)
        if problem is not None:  # its broken catalog must not break the cluster's
            log.warning("peer %s: /object_info ignored: %s", peer.name, problem)
            return
        info, malformed = capability.usable_classes(info)
        if malformed:
            log.warning("peer %s: %d node definition(s) in /object_info ignored as malformed: %s", peer.name,
                        len(malformed), ", ".join(map(str, malformed[:5])))
        try:  # ComfyUI before node replacements answers 404: it replaces nothing
            swaps = replacements.parse(await peer.get_json("/node_replacements", timeout=10, max_size=SMALL_BODY))
        except PeerError:
            swaps = {}
        if info != peer.object_info or swaps != peer.replacements:
            peer.object_info, peer.caps, peer.replacements = info, capability.Capabilities(info), swaps
            self._catalog = None
            self.changed()
            self.pump()

    async def on_message(self, peer: Peer, msg: dict) -> None:
        event, data = msg.get("type"), msg.get("data")
        if not isinstance(data, dict):
            return
        pid = data.get("prompt_id")
        task = peer.tasks.get(pid) if pid else None
        if task is None:
            return  # the peer's own status broadcasts, or prompts not ours
        if event == "execution_start":
            task.state, task.started_at = RUNNING, time.time()
            peer.running = pid
            self.db.update_task(task)
            peer.progress = None
            self.changed()
            self.spawn(self.broadcast_status())
        elif event == "progress":
            peer.progress = {k: data.get(k) for k in ("prompt_id", "node", "value", "max")}
            self.changed()
        elif event == "executed":
            data = {**data, "output": without_asset_ids(data.get("output"))}
            self.outputs.record(peer, (data.get("output") or {}), fresh=True)
        if event in _STATUS_EVENTS:
            task.messages.append([event, data])
        if event in TERMINAL_EVENTS:
            peer.release(pid)
            peer.progress = None
            if task.started_at:
                seconds = time.time() - task.started_at
                success = event == "execution_success"
                peer.record_job(seconds, task.predicted if success else None)
                if success:
                    # in the cluster's typical peer's time, so a slow GPU's runs do not
                    # make its workflows look long
                    typical = seconds / (peer.pace or 1.0)
                    self.costs.observe(task.shape, typical)
                    self.db.add_run(task.shape, typical)
                self.metrics.job(peer.name, seconds)
            if len(self.queue):
                peer.freed_at = time.perf_counter()  # work waits: the gap until it gets some starts now
            if event != "execution_success":
                peer.jobs_failed += 1
            self.changed()
            self.pump()
        if event == "executing" and data.get("node") is None:
            await self._finish(task, peer)
            return
        await self.relay.json(task.client_id, event, data, pid)

    async def on_binary(self, peer: Peer, data: bytes) -> None:
        if len(data) < 4:
            return
        event = int.from_bytes(data[:4], "big")
        payload = data[4:]
        if event == PREVIEW_IMAGE_WITH_METADATA:
            parsed = parse_preview(payload)
            task = peer.tasks.get(parsed[0].get("prompt_id")) if parsed else None
            if task is not None:
                await self.relay.preview(task.client_id, payload, task.prompt_id)
            return
        task = peer.tasks.get(peer.running) if peer.running else None
        if task is not None:
            await self.relay.binary(task.client_id, event, payload, task.prompt_id)

    # -- history -----------------------------------------------------------------------
    def _add_history(self, prompt_id: str, entry: dict) -> None:
        entry = self.history.add(prompt_id, entry)
        task = self.tasks.get(prompt_id)
        if task is not None:
            self.polls.ended(prompt_id, task)
        self.db.add_history(prompt_id, entry["prompt"][0], entry)
        if len(self.history) % 1000 == 0:
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

    async def _finish(self, task: Task, peer: Peer) -> None:
        """The peer is done with the prompt: record history, then tell the client."""
        peer.forget(task.prompt_id)
        entry = None
        try:
            got = await peer.get_json(f"/history/{quote(task.prompt_id, safe='')}", timeout=10)
            entry = got.get(task.prompt_id) if isinstance(got, dict) else None
        except PeerError as e:
            log.warning("peer %s: history of %s unavailable (%s); using relayed events", peer.name, task.prompt_id, e)
        if not isinstance(entry, dict):
            entry = {"outputs": {}, "meta": {}, "status": None}
        entry = dict(entry)
        # whatever the peer's entry holds, ours has ComfyUI's shape (a peer's odd answer
        # must not leave the prompt unfinished)
        theirs = entry.get("prompt")
        outputs = theirs[4] if isinstance(theirs, list) and len(theirs) > 4 else None
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
        for node_outputs in entry["outputs"].values():  # history: by node, then kind
            if isinstance(node_outputs, dict):
                self.outputs.record(peer, node_outputs)
        ok = entry["status"].get("status_str") == "success"
        interrupted = any(isinstance(m, list) and m and m[0] == "execution_interrupted"
                          for m in entry["status"].get("messages") or [])
        task.state = DONE if ok else CANCELLED if interrupted else FAILED
        task.finished_at = time.time()
        _outcome(task, task.state)
        entry["comfylb"] = {"attempts": task.attempt_log}
        self._add_history(task.prompt_id, entry)
        self.tasks.pop(task.prompt_id, None)
        task.drop_secrets()
        self.db.update_task(task)
        task.let_go(keep_prompt=task in self.polls.lingering())  # the history entry holds its prompt
        self.counts["completed" if ok else "cancelled" if interrupted else "failed"] += 1
        self.changed()
        await self._retire_if_idle(peer)
        await self.broadcast_status()
        await self.relay.json(task.client_id, "executing", {"node": None, "prompt_id": task.prompt_id}, task.prompt_id)
        await self.relay.end(task.client_id, task.prompt_id)

    # -- queue control ---------------------------------------------------------------
    def queue_remaining(self) -> int:
        return len(self.tasks)

    async def broadcast_status(self) -> None:
        await self.relay.status(self.queue_remaining())

    def queue_snapshot(self, polled: bool = False) -> tuple[list[Task], list[Task]]:
        """(running, pending), pending in the order they will run; `polled`: GET /queue,
        whose running list keeps a job a poller has not yet seen end (polls.py)."""
        running = [t for t in self.tasks.values() if t.state == RUNNING]
        if polled:
            running += [t for t in self.polls.lingering() if t.prompt_id not in self.tasks]
        waiting = [t for t in self.tasks.values() if t.state == DISPATCHED]
        waiting.sort(key=lambda t: (t.number, t.seq))
        return running, waiting + list(self.queue)

    async def delete(self, prompt_ids: list[str]) -> None:
        """POST /queue {delete}: pending prompts leave the queue; dispatched ones are
        deleted on their peer; running ones are left alone, as in ComfyUI."""
        for pid in prompt_ids:
            await self._dequeue(pid)
        await self.broadcast_status()
        self.pump()

    async def _dequeue(self, pid: str) -> bool:
        """A pending prompt (here or in its peer's queue) never runs: True if it was taken."""
        task = self.queue.remove(pid)
        if task is None:
            task = self.tasks.get(pid)
            if task is None or task.state != DISPATCHED or task.peer not in self.peers:
                return False
            await self._delete_on_peer(task, self.peers[task.peer])
        else:
            self._cancelled(task)
        if task.state != CANCELLED:
            return False
        await self.relay.end(task.client_id, task.prompt_id)  # deleted silently, as ComfyUI does
        return True

    async def cancel_job(self, prompt_id: str) -> bool:
        """POST /api/jobs/{id}/cancel, as today's ComfyUI: a pending job is dequeued
        silently, a running one interrupted on its peer; True if either happened."""
        task = self.tasks.get(prompt_id)
        if task is None:
            return False
        if task.state != RUNNING and await self._dequeue(prompt_id):
            await self.broadcast_status()
            self.pump()
            return True
        if self.tasks.get(prompt_id) is not task:
            return False  # it ended meanwhile
        return await self.interrupt(prompt_id)

    async def clear(self) -> None:
        for task in self.queue.clear():
            self._cancelled(task)
            await self.relay.end(task.client_id, task.prompt_id)
        for task in [t for t in self.tasks.values() if t.state == DISPATCHED]:
            await self._dequeue(task.prompt_id)
        await self.broadcast_status()
        self.pump()

    async def _delete_on_peer(self, task: Task, peer: Peer) -> None:
        if await self._withdraw(task, peer):
            self._cancelled(task)

    def _cancelled(self, task: Task) -> None:
        self.polls.forget(task.prompt_id)
        task.state, task.finished_at = CANCELLED, time.time()
        _outcome(task, CANCELLED)
        self.tasks.pop(task.prompt_id, None)
        task.drop_secrets()
        self.db.update_task(task)
        task.let_go()
        self.counts["cancelled"] += 1
        self.changed()

    async def cancel(self, prompt_id: str) -> bool:
        """An operator's cancel: a queued task never runs, a dispatched one leaves its
        peer's queue, a running one is interrupted.  The client hears what ComfyUI says of
        an interrupted prompt, so a script waiting for it is not left hanging."""
        task = self.tasks.get(prompt_id)
        if task is None:
            return False
        if task.state == QUEUED:
            self.queue.remove(prompt_id)
            self._cancelled(task)
        elif task.state == DISPATCHED and task.peer in self.peers:
            await self._delete_on_peer(task, self.peers[task.peer])
        if task.state != CANCELLED:  # running (or it started while we asked its peer)
            await self.interrupt(prompt_id)
            return True
        await self.relay.json(task.client_id, "execution_interrupted", {
            "prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [], "timestamp": _now_ms()},
            prompt_id)
        await self.broadcast_status()
        await self.relay.json(task.client_id, "executing", {"node": None, "prompt_id": prompt_id}, prompt_id)
        await self.relay.end(task.client_id, prompt_id)
        self.pump()
        return True

    async def interrupt(self, prompt_id: str | None) -> bool:
        """POST /interrupt.  Without a prompt_id a single ComfyUI stops the one prompt it
        is running, whoever queued it: here that is the running prompt queued first, so
        one caller's interrupt never stops every peer.  True if a peer was asked."""
        if prompt_id is None:
            running = [t for t in self.tasks.values() if t.state == RUNNING]
            if not running:
                return False
            prompt_id = min(running, key=lambda t: (t.number, t.seq)).prompt_id
        task = self.tasks.get(prompt_id)
        peer = self.peers.get(task.peer) if task is not None and task.peer else None
        if peer is None:
            return False
        try:
            status, _ = await peer.post_json("/interrupt", {"prompt_id": prompt_id})
        except PeerError as e:
            log.warning("peer %s: interrupt failed: %s", peer.name, e)
            return False
        return status == 200

    # -- files -------------------------------------------------------------------------
    def producer_of(self, typ: str, subfolder: str, filename: str) -> Peer | None:
        name = self.outputs.holder(typ, subfolder, filename)
        peer = self.peers.get(name) if name else None
        return peer if peer is not None and not peer.removed else None

    def any_peer(self) -> Peer | None:
        ready = [p for p in self.peers.values() if p.available]
        return min(ready, key=lambda p: len(p.inflight)) if ready else None


def _rejection_message(task: Task, peer: str, status: int, body: Any) -> dict:
    """A peer's refusal at dispatch, as the execution_error a client understands."""
    node_id = node_type = None
    lines = []
    if isinstance(body, dict):
        err = body.get("error") or {}
        if isinstance(err, str):  # some ComfyUI versions answer {"error": "text"}
            lines.append(err)
        elif isinstance(err, dict):
            lines.append(f"{err.get('message', '')}: {err.get('details', '')}".strip(": "))
        node_errors = body.get("node_errors")
        for nid, ne in (node_errors.items() if isinstance(node_errors, dict) else ()):
            if not isinstance(ne, dict) or not isinstance(ne.get("errors", []), list):
                continue
            node_id = node_id or nid
            node_type = node_type or ne.get("class_type")
            for e in ne.get("errors", []):
                if not isinstance(e, dict):
                    continue
                lines.append(f"{ne.get('class_type', nid)} {nid}: {e.get('message', '')}: {e.get('details', '')}")
    else:
        lines.append(str(body)[:500])
    return {"prompt_id": task.prompt_id, "node_id": node_id, "node_type": node_type, "executed": [],
            "exception_message": f"Peer {peer} refused the prompt (HTTP {status}): " + "\n".join(lines),
            "exception_type": "comfylb.PeerRejected", "traceback": [], "current_inputs": {},
            "current_outputs": [], "timestamp": _now_ms()}



def _log_crash(t: asyncio.Task) -> None:
    if not t.cancelled() and t.exception() is not None:
        log.error("background task failed", exc_info=t.exception())
