"""Clients that poll a job by id, history first, then the queue.

Comfy-Org's API proxy (and scripts like it) read `/history/{id}` and, when the job is not
there yet, `/queue`; a job found in neither counts as lost.  A job that ends between the
two reads is in neither, on any single ComfyUI.  The coordinator can be more exact: a job
whose history was asked for while it was still live stays listed as running in `/queue`
after it ends, until its history is read again (the poller then sees it done) or LINGER
seconds pass.  Other jobs, and the jobs API, are unaffected.  Pure bookkeeping.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

LINGER = 30.0   # seconds a polled job stays listed after it ended
WATCHED_MAX = 10000

T = TypeVar("T")


class Polls(Generic[T]):
    def __init__(self, linger: float = LINGER) -> None:
        self.linger = linger
        self._watched: OrderedDict[str, None] = OrderedDict()   # live jobs whose history was asked for
        self._lingering: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def missed(self, job_id: str) -> None:
        """/history/{id} asked while the job was still pending or running."""
        self._watched[job_id] = None
        self._watched.move_to_end(job_id)
        while len(self._watched) > WATCHED_MAX:
            self._watched.popitem(last=False)

    def ended(self, job_id: str, job: T) -> None:
        """The job moved to history (or was dropped)."""
        if self._watched.pop(job_id, "absent") is None:
            self._lingering[job_id] = (time.monotonic() + self.linger, job)

    def forget(self, job_id: str) -> None:
        """Its history was read (or deleted): the poller knows."""
        self._watched.pop(job_id, None)
        self._lingering.pop(job_id, None)

    def lingering(self) -> list[T]:
        now = time.monotonic()
        while self._lingering and next(iter(self._lingering.values()))[0] <= now:
            self._lingering.popitem(last=False)
        return [job for _, job in self._lingering.values()]
