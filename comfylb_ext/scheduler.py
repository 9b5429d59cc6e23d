"""Load-balancing policy: given a task and the peers, pick one.  Pure functions, no I/O.

The dispatcher hands in a snapshot of each peer (`PeerView`); strategies only compare
numbers, so they are tested with plain data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .config import STRATEGIES, Order, Strategy


@dataclass(frozen=True)
class PeerView:
    name: str
    inflight: int          # prompts held on the peer (running + waiting in its own queue)
    max_queue: int
    weight: float = 1.0
    available: bool = True  # enabled, linked and healthy
    last_pick: int = -1     # sequence number of the last dispatch to it (-1: never)
    job_time: float | None = None  # moving average of its job time (None: not known yet)
    models: frozenset = frozenset()  # model files of the last prompt sent to it
    cached: frozenset = frozenset()  # cache keys of the last prompt sent to it (capability.cache_keys)

    @property
    def has_room(self) -> bool:
        return self.available and self.inflight < self.max_queue


@dataclass
class SchedulerState:
    strategy: Strategy = Strategy.LEAST_BUSY
    prefer_idle: bool = True
    affinity: bool = True  # prefer a peer that already has the prompt's models loaded
    order: Order = Order.FIFO
    cursor: int = 0  # round_robin position


def eligible(peers: Sequence[PeerView], prefer_idle: bool) -> list[PeerView]:
    room = [p for p in peers if p.has_room]
    if prefer_idle:
        idle = [p for p in room if p.inflight == 0]
        if idle:
            return idle
    return room


def pick(peers: Sequence[PeerView], state: SchedulerState, models: frozenset = frozenset(),
         keys: frozenset = frozenset()) -> PeerView | None:
    """The peer that should get the next task, or None if no peer has room.

    With affinity, a peer that already holds the task's models wins among the peers the
    strategy would consider, and among those the one whose last prompt shares the most
    of its nodes (ComfyUI serves those from its cache) — but never over an idle peer
    while the matching one is busy.  Ties go to the peer that was picked longest ago, so
    equal peers share work evenly.
    """
    if state.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {state.strategy!r}")
    candidates = eligible(peers, state.prefer_idle)
    if not candidates:
        return None
    if state.affinity and (models or keys):
        idle = [p for p in candidates if p.inflight == 0]
        pool = idle or candidates
        warm = [p for p in pool if models and p.models == models] or pool
        shared = {p.name: len(p.cached & keys) for p in warm}
        best = max(shared.values())
        if warm is not pool or best > 0:  # only with a reason: the strategy decides otherwise
            candidates = [p for p in warm if shared[p.name] == best]
    if state.strategy == Strategy.LEAST_BUSY:
        # An idle peer first; among busy ones, the one whose queue empties soonest.
        return min(candidates, key=lambda p: (p.inflight > 0, expected_wait(p, peers), -p.weight, p.last_pick))
    if state.strategy == Strategy.WEIGHTED:
        # Fill peers in proportion to their weight: the lowest load per unit of weight wins.
        return min(candidates, key=lambda p: ((p.inflight + 1) / p.weight, p.last_pick))
    # round_robin: the next eligible peer after the cursor, in configuration order.
    names = [p.name for p in peers]
    order = {p.name: (names.index(p.name) - state.cursor) % len(names) for p in candidates}
    chosen = min(candidates, key=lambda p: order[p.name])
    state.cursor = (names.index(chosen.name) + 1) % len(names)
    return chosen


def expected_wait(p: PeerView, peers: Sequence[PeerView]) -> float:
    """When a task sent to `p` now would finish, from its moving-average job time: a fast
    GPU with two prompts ahead beats a slow one with one if it is enough faster."""
    known = [q.job_time for q in peers if q.job_time]
    typical = sum(known) / len(known) if known else 1.0
    return (p.inflight + 1) * (p.job_time or typical)


def longest_first(queued: Sequence[tuple[float, float | None, int]], limit: int) -> list[int]:
    """The order to dispatch queued prompts in, as indices into `queued`, which holds
    (number, predicted seconds or None, times overtaken) in queue order.

    Longest predicted first, so a batch ends on short prompts and the peers finish
    together.  Prompts queued at the front (negative number) and prompts overtaken
    `limit` times keep queue order ahead of the rest, so none waits forever; a prompt
    with no prediction counts as a typical one.
    """
    known = [c for _, c, _ in queued if c is not None]
    typical = sum(known) / len(known) if known else 0.0

    def key(i: int) -> tuple:
        number, cost, overtaken = queued[i]
        pinned = number < 0 or overtaken >= limit
        return (not pinned, -(typical if cost is None else cost) if not pinned else 0.0, i)
    return sorted(range(len(queued)), key=key)
