"""The coordinator: moves tasks from the queue to peers, with what it takes to do so:
the peers, the catalog of what they offer, and the ledger of every task.

Event-driven: every change that can free capacity (a peer's terminal event, a peer
linking or turning healthy, a new task) calls `pump()`, which hands out work at once.
Nothing polls between "a peer is free" and "the peer has work".  What peers say is
handled in peerevents.py, losses and rebalancing in recovery.py, queue control in
control.py; a task's state changes only in ledger.py.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Coroutine, Iterator

import aiohttp

from . import admission, capability, routing
from .admission import Checked
from .catalog import Catalog
from .config import BackendConfig, Config, Order, Strategy
from .control import QueueControl
from .cost import CostModel
from .edges import Edges, shared_secret
from .errors import Rejection, error, peer_refusal
from .health import HealthChecker
from .ledger import RUNS_KEPT, Ledger
from .metrics import Metrics
from .notify import STATUS_EVENT, Notifier
from .outputs import Outputs, ViewCache
from .peer import SMALL_BODY, Peer, PeerError, clean_system_stats, why_unavailable
from .peerevents import PeerEvents
from .provisioning import Provisioner
from .recovery import Recovery
from .relay import Hub, Relay
from .scheduler import SchedulerState, longest_first, pick
from .store import BIG_ROW, Snapshot, StateStore, Store, StoreError
from .tasks import DISPATCHED, QUEUED, Task
from .transfers import Agents, Transfers
from .uploads import InputStore, file_ref

log = logging.getLogger(__name__)

__all__ = ["Cluster", "STATUS_EVENT", "ITSELF"]

SNAPSHOT_TASKS = 50               # queued/running tasks included in a push
# what /lb/scheduler/{key}/{value} may set
SCHEDULER_CHOICES: dict[str, type[Strategy] | type[Order]] = {"strategy": Strategy, "order": Order}
OBJECT_INFO_EVERY = 12            # health checks between refreshes of a peer's /object_info
PUMP_SCAN = 1000                  # queued tasks looked at per dispatch for one a free peer may run
AFFINITY_LOOKAHEAD = 64           # queued tasks a warm peer looks through for one using its models
ORDER_WINDOW = 64                 # longest_first: queued tasks reordered; also the most times one is overtaken
PREFETCH_MAX = 32 << 20           # outputs larger than this are relayed on demand, not copied ahead
ITSELF = ("this address is this ComfyLB itself, not a peer: list the other ComfyUI instances under backends "
          "(127.0.0.1:8188 is ComfyUI's own default address)")
STORE_CHECK_EVERY = 2.0           # seconds between checks that the state database is still there and writable


class Cluster:
    def __init__(self, cfg: Config, hub: Hub, store: InputStore, db: StateStore | None = None) -> None:
        self.cfg = cfg
        self.db: StateStore = db or Store(None)
        self.hub = hub
        self.relay = Relay(hub, cfg.server.ordered_delivery)
        self.store = store
        self.peers: dict[str, Peer] = {}
        self._bg: set[asyncio.Task] = set()
        self.notify = Notifier(hub, self.spawn, self.snapshot, lambda: self.ledger.remaining())
        self.ledger = Ledger(self.db, self.relay, self.notify)
        self.catalog = Catalog(lambda: self.peers.values(), self.spawn, self._offer_changed)
        self.sched = SchedulerState(cfg.scheduler.strategy, cfg.scheduler.prefer_idle, cfg.scheduler.affinity,
                                    cfg.scheduler.order)
        self.costs = CostModel()
        self.instance_id = uuid.uuid4().hex  # this process, as its answers say (peer.INSTANCE_HEADER)
        # Stable across restarts: prompts already on a peer keep sending their events to us.
        self.client_id = self.db.get("client_id") or "comfylb-" + uuid.uuid4().hex
        self.db.put("client_id", self.client_id)
        self.started_at = time.time()
        self._picks = itertools.count()
        self.runtime_peers: dict[str, BackendConfig] = {}  # added by POST /lb/backends, kept in the database
        self._waiting: str | None = None  # why prompts wait, as last said
        self.session: aiohttp.ClientSession | None = None
        self.health = HealthChecker(cfg.health_check, lambda: self.peers.values(), self.check_peer)
        self.metrics = Metrics(lambda: self.peers.values(), self.ledger)
        cache = ViewCache(Path(cfg.storage.dir) / "view-cache" if self.db.path != ":memory:" else None,
                          cfg.storage.view_cache_mb << 20)
        self.outputs = Outputs(self.db, cache, PREFETCH_MAX, cfg.storage.prefetch_outputs, self.spawn, self.changed)
        self.recovery = Recovery(cfg=cfg.queue, ledger=self.ledger, relay=self.relay, peers=self.peers,
                                 spawn=self.spawn, pump=self.pump, finish=lambda t, p: self.events.finish(t, p))
        self.events = PeerEvents(ledger=self.ledger, relay=self.relay, outputs=self.outputs, catalog=self.catalog,
                                 notify=self.notify, metrics=self.metrics, recovery=self.recovery, spawn=self.spawn,
                                 learn=self.learn, slot_freed=self.pump, drained=self._retire_if_idle)
        self.control = QueueControl(self.ledger, self.peers, self.recovery, self.notify, self.pump)
        self.transfers = Transfers(Agents(cfg.auth.agent_secret), self.peers.get, lambda: self.session, self.spawn,
                                   self.changed, self.catalog.refresh, cfg.provisioning.copies_at_once)
        self.events.agents = self.transfers.agents
        self.provisioner = Provisioner(cfg.provisioning, self.peers, self.catalog, self.transfers, self.spawn,
                                       self._tell_waiting)
        self.edges = Edges(peers=self.peers, events=self.events, recovery=self.recovery, relay=self.relay,
                           secret=shared_secret(self.db), session=lambda: self.session, spawn=self.spawn,
                           changed=self.changed)

    # what other modules and tests read; the ledger owns it
    tasks = property(lambda self: self.ledger.tasks)
    record = property(lambda self: self.ledger.record)
    history = property(lambda self: self.ledger.history)
    queue = property(lambda self: self.ledger.queue)
    counts = property(lambda self: self.ledger.counts)
    polls = property(lambda self: self.ledger.polls)
    state_changed = property(lambda self: self.notify.state_changed)

    def changed(self) -> None:
        self.notify.changed()

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
        await self._fetch_inputs()
        self._restore()
        self.health.start()
        self.spawn(self._keep_state_on_disk())
        self.spawn(self.relay.keep_delivering())
        log.info("coordinator up with %d peer(s), strategy %s%s", len(self.peers), self.sched.strategy,
                 f"; {len(self.runtime_peers)} of them added at runtime ({', '.join(self.runtime_peers)}: kept in "
                 "the state database, not the config; DELETE /lb/backends/{name} removes one for good)"
                 if self.runtime_peers else "")

    async def _fetch_inputs(self) -> None:
        """Uploads another coordinator took while it led (a shared database keeps them)."""
        got = await asyncio.wrap_future(self.db.fetch_inputs(self.store.digest_of, self.store.put))
        if got:
            log.info("%d uploaded input(s) fetched from the state database", got)

    def _restore(self) -> None:
        """Pick up where the last run stopped: history, counters, files, and every task
        not yet finished (queued ones wait again; those on a peer are reconciled with it
        as soon as it links)."""
        for shape, seconds in self.db.load_runs(keep=RUNS_KEPT):
            self.costs.observe(shape, seconds)
        for task in self.ledger.restore(lambda t: t.peer in self.peers):
            self.peers[str(task.peer)].assign(task)
        self.edges.restored()
        for task in self.ledger.tasks.values():
            task.req = capability.requirements(task.prompt or {})
        self.pump()

    async def _keep_state_on_disk(self) -> None:
        """A write that failed (a full disk) or a database file deleted under us: the whole
        state, which memory still holds, is written again as soon as the disk takes it."""
        while True:
            await asyncio.sleep(STORE_CHECK_EVERY)
            if self.db.needs_rebuild():
                self.db.rebuild(self.state_snapshot())

    def state_snapshot(self) -> Snapshot:
        return Snapshot(meta={"client_id": self.client_id, "number": self.ledger.numbering.next},
                        peers=list(self.runtime_peers.values()), tasks=list(self.ledger.record.values()),
                        history=list(self.ledger.history_rows()), files=dict(self.outputs.holders),
                        runs=list(self.costs.runs()))

    async def stop(self) -> None:
        await self.health.stop()
        await self.edges.close()
        self.db.close()
        await asyncio.gather(*(p.stop() for p in self.peers.values()), return_exceptions=True)
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        if self.session:
            await self.session.close()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        t.add_done_callback(_log_crash)
        return t

    # -- what the panel shows -------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything the panel shows, in one message."""
        return {"stats": self.stats(), "backends": [p.describe() for p in self.peers.values()],
                "scheduler": self.scheduler_info(), "queue": [t.summary() for t in self.ledger.live(SNAPSHOT_TASKS)],
                "transfers": self.transfers.describe()}

    def stats(self) -> dict:
        peers = self.peers.values()
        return {
            "uptime": time.time() - self.started_at,
            "totals": self.ledger.totals(),
            "queue_depth": len(self.ledger.queue),
            "in_flight": sum(len(p.inflight) for p in peers),
            "backends": {p.name: {"in_flight": len(p.inflight), "jobs_done": p.jobs_done, "jobs_failed": p.jobs_failed,
                                  "mean_job_time": p.mean_job_time} for p in peers},
            "storage": {"ok": self.db.problem is None, "problem": self.db.problem},
            "waiting": self._waiting,
            "edges": self.edges.describe(),
        }

    def scheduler_info(self) -> dict:
        s = self.sched
        return {"strategy": s.strategy, "prefer_idle": s.prefer_idle, "affinity": s.affinity, "order": s.order,
                "strategies": list(Strategy.names()), "orders": list(Order.names())}

    # -- peers at runtime --------------------------------------------------------------
    def add_peer(self, b: BackendConfig, persist: bool = False) -> Peer:
        """persist: added at runtime (POST /lb/backends), so it is still there after a restart."""
        assert self.session is not None
        if persist:
            self.db.save_peer(b)
            self.runtime_peers[b.name] = b
        peer = Peer(b, self.session, self.client_id, self.events, self.cfg.health_check.timeout * 10)
        peer.source = "runtime" if b.name in self.runtime_peers else "config"
        self.peers[b.name] = peer
        peer.start()
        self.spawn(self.check_peer(peer))
        self.spawn(self.edges.peers_changed())
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
        self.catalog.invalidate()
        self.changed()
        await self.edges.peers_changed()
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
        choice: Strategy | Order = SCHEDULER_CHOICES[key](value)  # ValueError: not one of them
        if getattr(self.sched, key) != value:
            log.info("%s: %s -> %s", key, getattr(self.sched, key), value)
            setattr(self.sched, key, choice)
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
            self.spawn(self.catalog.refresh(peer))  # nodes or models may have been added
        if peer.health.record(ok, self.cfg.health_check, error):
            if ok:
                log.info("peer %s: healthy after %d good check(s)", peer.name, peer.health.successes)
            else:
                log.warning("peer %s: unhealthy after %d failed check(s): %s", peer.name, peer.health.failures, error)
                if peer.tasks:
                    self.spawn(self.recovery.recover_after(peer))
            if ok and peer.abandoned:
                self.spawn(self.recovery.drop_abandoned(peer))
            self.changed()
            self.pump()

    # -- submission ----------------------------------------------------------------
    def _offer_changed(self) -> None:
        self.changed()
        self.pump()

    def admission_context(self) -> admission.Context:
        nodes = self.catalog.merged()
        return admission.Context(nodes, self.catalog.swaps() if nodes is not None else {},
                                 [p for p in self.peers.values() if not p.removed], self._known_file)

    async def submit(self, data: Any, size: int = 0) -> tuple[Task, dict]:
        """POST /prompt: the accepted task and ComfyUI's node_errors (of outputs left out),
        or a Rejection with ComfyUI's answer.  A large
        prompt (`size` bytes) is checked off the event loop: it may take a second."""
        number = admission.number(data, self.ledger.numbering)
        ctx = self.admission_context()
        checked = (await asyncio.to_thread(admission.check, data, number, ctx) if size > BIG_ROW
                   else admission.check(data, number, ctx))
        return await self.accept(checked, size), checked.node_errors

    async def accept(self, c: Checked, size: int = 0) -> Task:
        if self.ledger.taken(c.prompt_id):
            raise Rejection(409, error("duplicate_prompt_id", "A prompt with this prompt_id is already pending or "
                                       "running.", c.prompt_id))
        if len(self.ledger.queue) >= self.cfg.queue.max_size:
            raise Rejection(503, error("queue_full", "The queue is full; try again later.",
                                       f"{len(self.ledger.queue)} prompts are waiting (queue.max_size)"))
        task = Task(c.prompt_id, c.number, c.prompt, c.extra_data, c.outputs, client_id=c.client_id,
                    partial_targets=c.partial, targets=c.targets, known_shape=c.shape, size=size)
        task.req = c.req
        try:
            await self.ledger.accepted(task)
        except StoreError as e:
            raise Rejection(503, error("storage_unavailable", "The coordinator cannot store the prompt; try again "
                                       "later.", str(e))) from None
        was_waiting = self._waiting
        self.pump()
        if was_waiting and task.state == QUEUED:  # a new reason was told to every queued prompt already
            self._tell_waiting(task)
        return task

    def _known_file(self, value: str) -> bool:
        """A file a prompt names is here (uploaded) or on a peer (an output it made)."""
        ref = file_ref(value)
        return ref is not None and (self.store.lookup(*ref) is not None or self.outputs.holder(*ref) is not None)

    # -- dispatch ------------------------------------------------------------------
    def pump(self) -> None:
        self._pump()
        reason = self.waiting_reason()
        if reason != self._waiting:  # said once per change, not at every event
            told, self._waiting = self._waiting, reason
            if reason:
                log.warning("%d prompt(s) wait: %s", len(self.ledger.queue), reason)
                for task in self.ledger.queue if not told else ():  # the submitters were told already
                    self._tell_waiting(task)
            else:
                log.info("prompts are being dispatched again")
            self.changed()

    def _tell_waiting(self, task: Task, why: str | None = None) -> None:
        if task.client_id and (self._waiting or why):
            configured = any(not p.removed for p in self.peers.values())
            self.notify.tell_waiting(task.client_id, task.prompt_id, why or (
                f"no peer is {'available right now' if configured else 'configured'}; the prompt waits in the queue until one is"))

    def waiting_reason(self) -> str | None:
        """Why queued prompts wait although they could run, for people: None when they
        only wait their turn on busy peers."""
        if not len(self.ledger.queue) or any(p.available for p in self.peers.values()):
            return None
        return why_unavailable([p for p in self.peers.values() if not p.removed])

    def _pump(self) -> None:
        """Hand queued tasks to peers with room, best first, until one side runs out.

        A task that only some peers may run (a routing rule) does not hold up the tasks
        behind it: they may take a peer it cannot use."""
        while True:
            # longest_first decides each peer's next prompt when the peer is free: a prompt
            # sent ahead to a busy peer's queue starts later than its place in the order
            cap = 1 if self.sched.order == Order.LONGEST_FIRST else None
            peers = [p for p in self.peers.values() if p.view(cap).has_room]
            if not peers:
                return
            if not len(self.ledger.queue):
                self.recovery.steal_for([p for p in peers if not p.inflight])
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
                self.provisioner.consider(self.ledger.queue.ordered(), peers)
                return
            peer = self.peers[chosen.name]
            task = self._warm_alternative(task, peer)
            for ahead in itertools.takewhile(lambda t: t is not task, window):
                ahead.overtaken += 1
            peer.models = task.req.model_key if task.req else frozenset()
            peer.cached = task.req.cache_keys if task.req else frozenset()
            if peer.freed_at is not None:
                self.metrics.gap(peer.name, time.perf_counter() - peer.freed_at)
                peer.freed_at = None
            peer.last_pick = next(self._picks)
            self.ledger.dispatched(task, peer.name, self.costs.predict(task.shape), self.edges.via(task, peer))
            peer.assign(task)
            self.spawn(self._send(task, peer))

    def _dispatch_order(self) -> tuple[list[Task], Iterator[Task]]:
        """Queued tasks in the order to dispatch them, and (with longest_first) the
        window of them that was reordered, in queue order."""
        queued = self.ledger.queue.ordered()
        if self.sched.order != Order.LONGEST_FIRST:
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
        for depth, other in enumerate(self.ledger.queue.ordered()):
            if depth >= AFFINITY_LOOKAHEAD:
                break
            if (other.req and other.req.model_key == peer.models and peer.matches(other.targets)
                    and peer.can_run(other.req)):
                return other
        return task

    def _payload(self, task: Task, peer: Peer) -> dict:
        body = {"prompt": routing.per_peer_outputs(task.prompt or {}, peer.name),
                "client_id": task.via or self.client_id, "prompt_id": task.prompt_id,
                "extra_data": {k: v for k, v in task.extra_data.items() if k != "client_id"}}
        if task.partial_targets is not None:
            body["partial_execution_targets"] = task.partial_targets
        return body

    async def _send(self, task: Task, peer: Peer) -> None:
        if task.via:
            await self.edges.tell(task.via, task, peer)
        try:
            for f in self.store.references(task.prompt or {}):
                await peer.deliver(f, self.store.path_of(f))
            status, body = await peer.post_json("/prompt", self._payload(task, peer))
        except PeerError as e:
            task.tell_verdict(None, None)
            if peer.tasks.get(task.prompt_id) is task and task.state == DISPATCHED:
                log.warning("peer %s: could not take %s (%s); back to the queue", peer.name, task.prompt_id, e)
                peer.forget(task.prompt_id)
                self.ledger.requeued(task)
                self.pump()
            return
        awaited = task.tell_verdict(status, body)
        if status == 200 or status == 409:
            return  # 409: today's ComfyUI already holds this id, from an attempt whose answer we lost
        if peer.tasks.get(task.prompt_id) is not task:
            return
        log.info("peer %s rejected %s: HTTP %s", peer.name, task.prompt_id, status)
        self.spawn(self.catalog.refresh(peer))  # what it has may have changed
        peer.forget(task.prompt_id)
        if awaited and status == 400:
            await self.ledger.withdrawn(task)  # its submitter gets the peer's 400 instead of a 200
        else:
            await self.ledger.failed(task, peer_refusal(task.prompt_id, peer.name, status, body))
        self.pump()

    def learn(self, task: Task, seconds: float) -> None:
        """A successful run's time, in the cluster's typical peer's time (so a slow GPU's
        runs do not make its workflows look long), for the cost model."""
        self.costs.observe(task.shape, seconds)
        self.db.add_run(task.shape, seconds)

    # -- files -------------------------------------------------------------------------
    def producer_of(self, typ: str, subfolder: str, filename: str) -> Peer | None:
        name = self.outputs.holder(typ, subfolder, filename)
        peer = self.peers.get(name) if name else None
        return peer if peer is not None and not peer.removed else None

    def any_peer(self) -> Peer | None:
        ready = [p for p in self.peers.values() if p.available]
        return min(ready, key=lambda p: len(p.inflight)) if ready else None


def _log_crash(t: asyncio.Task) -> None:
    if not t.cancelled() and t.exception() is not None:
        log.error("background task failed", exc_info=t.exception())
