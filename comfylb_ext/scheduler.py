"""Load-balancing policy: given a task and the peers, pick one.  Pure functions, no I/O.

The dispatcher hands in a snapshot of each peer (`PeerView`); strategies only compare
numbers, so they are tested with plain data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .config import STRATEGIES


@dataclass(frozen=True)
class PeerView:
    name: str
    inflight: int          # prompts held on the peer (running + waiting in its own queue)
    max_queue: int
    weight: float = 1.0
    available: bool = True  # enabled, linked and healthy
    last_pick: int = -1     # sequence number of the last dispatch to it (-1: never)

    @property
    def has_room(self) -> bool:
        return self.available and self.inflight < self.max_queue


@dataclass
class SchedulerState:
    strategy: str = "least_busy"
    prefer_idle: bool = True
    cursor: int = 0  # round_robin position


def eligible(peers: Sequence[PeerView], prefer_idle: bool) -> list[PeerView]:
    room = [p for p in peers if p.has_room]
    if prefer_idle:
        idle = [p for p in room if p.inflight == 0]
        if idle:
            return idle
    return room


def pick(peers: Sequence[PeerView], state: SchedulerState) -> PeerView | None:
    """The peer that should get the next task, or None if no peer has room.

    Ties go to the peer that was picked longest ago, so equal peers share work evenly.
    """
    if state.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {state.strategy!r}")
    candidates = eligible(peers, state.prefer_idle)
    if not candidates:
        return None
    if state.strategy == "least_busy":
        return min(candidates, key=lambda p: (p.inflight, -p.weight, p.last_pick))
    if state.strategy == "weighted":
        # Fill peers in proportion to their weight: the lowest load per unit of weight wins.
        return min(candidates, key=lambda p: ((p.inflight + 1) / p.weight, p.last_pick))
    # round_robin: the next eligible peer after the cursor, in configuration order.
    names = [p.name for p in peers]
    order = {p.name: (names.index(p.name) - state.cursor) % len(names) for p in candidates}
    chosen = min(candidates, key=lambda p: order[p.name])
    state.cursor = (names.index(chosen.name) + 1) % len(names)
    return chosen
