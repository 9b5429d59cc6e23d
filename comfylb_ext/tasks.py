"""The task record and the coordinator queue (pure data, no I/O)."""
from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import jsonsafe
from .cost import Shape, shape
from .textenum import TextEnum



class State(TextEnum):
    """A task's state, in the order a task normally moves through them; only the ledger
    (ledger.py) changes it."""
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


QUEUED, DISPATCHED, RUNNING, DONE, FAILED, CANCELLED = State
TERMINAL = frozenset({DONE, FAILED, CANCELLED})

ITEM_JSON_KEPT = 1 << 20  # characters: a queue item's JSON kept for GET /queue up to this size
# extra_data keys that carry Comfy.org credentials: forwarded to the executing peer, never shown.
SENSITIVE_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


@dataclass(eq=False)
class Task:
    prompt_id: str
    number: float
    prompt: dict | None  # None once it has ended (let_go)
    extra_data: dict
    outputs: list[str]
    client_id: str | None = None
    partial_targets: list[str] | None = None
    targets: frozenset[str] | None = None  # peer names/tags a routing rule allows (None: any)
    req: Any = None  # capability.Requirements: node types and model files it needs
    stealing: bool = False  # being taken back from its peer's queue for an idle peer
    overtaken: int = 0  # times a prompt queued after it was dispatched first (longest_first)
    predicted: float | None = None  # the cost model's run time for it when dispatched
    secrets_dropped: bool = False  # its Comfy.org keys were taken out when it finished: rewrite its row
    verdict: Any = None  # asyncio.Future of its first peer's answer while its submitter waits for it
    known_shape: Shape | None = field(default=None, repr=False)  # made at admission, off the event loop
    _item_json: str | None = field(default=None, repr=False)
    seq: int = 0
    size: int = 0  # bytes of the request that brought it (0: not known, as for tasks saved before)
    state: State = QUEUED
    peer: str | None = None
    attempts: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    # [event, data] pairs of execution_start/cached/terminal, for a history entry we must
    # write ourselves when the peer's own is unavailable.
    messages: list = field(default_factory=list)
    # One entry per dispatch: {"peer", "at", "outcome"}; shown in history under "comfylb".
    attempt_log: list = field(default_factory=list)

    @property
    def via(self) -> str | None:
        """The edge (edges.py) it was dispatched through while it is on a peer: the client
        id the peer sends its events to (None: the cluster's own)."""
        if self.state not in (State.DISPATCHED, State.RUNNING) or not self.attempt_log:
            return None
        return self.attempt_log[-1].get("via")

    @property
    def shape(self) -> Shape:
        """Its workflow and numbers, for the cost model (made once)."""
        if self.known_shape is None:
            self.known_shape = shape(self.prompt if self.prompt is not None else {})
        return self.known_shape

    def tell_verdict(self, status: int | None, body: Any) -> bool:
        """Hand the first peer's answer to a submitter waiting for it: True if one was."""
        if self.verdict is None or self.verdict.done():
            return False
        self.verdict.set_result((status, body))
        return True

    @property
    def create_time(self) -> int:
        """When it was submitted, in ms: ComfyUI's extra_data.create_time (tasks saved by
        an older ComfyLB have none)."""
        value = self.extra_data.get("create_time")
        return value if isinstance(value, int) else int(self.created * 1000)

    def drop_secrets(self) -> None:
        """A finished task needs no Comfy.org keys any more (the database keeps none either)."""
        if any(k in self.extra_data for k in SENSITIVE_KEYS):
            self.secrets_dropped = True
            self.extra_data = {k: v for k, v in self.extra_data.items() if k not in SENSITIVE_KEYS}

    def public_extra_data(self) -> dict:
        extra = {k: v for k, v in self.extra_data.items() if k not in SENSITIVE_KEYS}
        if self.client_id is not None:
            extra["client_id"] = self.client_id
        return extra

    def summary(self) -> dict:
        """The task as /lb/tasks shows it (no prompt graph, no credentials)."""
        return {"task_id": self.prompt_id, "prompt_id": self.prompt_id, "state": self.state, "peer": self.peer,
                "number": self.number, "attempts": self.attempts, "client_id": self.client_id,
                "error": self.error, "created": self.created, "dispatched_at": self.dispatched_at,
                "started_at": self.started_at, "finished_at": self.finished_at}

    def queue_item(self) -> list[Any]:
        """ComfyUI's queue tuple: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
        return [self.number, self.prompt_id, self.prompt, self.public_extra_data(), list(self.outputs)]

    @property
    def item_json_made(self) -> bool:
        return self._item_json is not None

    def queue_item_json(self) -> str:
        """queue_item() as JSON, made once and kept unless it is large (none of its parts
        change after submission): GET /queue of thousands of prompts answers fast, and a
        large prompt is not kept twice."""
        item_json = self._item_json
        if item_json is None:
            item_json = jsonsafe.dumps(self.queue_item())
            if len(item_json) <= ITEM_JSON_KEPT and self.prompt is not None:
                self._item_json = item_json
        return item_json

    def let_go(self, keep_prompt: bool = False) -> None:
        """It has ended: drop what only a live task needs, so the thousands of finished
        tasks kept for /lb/tasks hold no prompts (the history entry has it while it is
        kept).  `keep_prompt`: GET /queue still lists it for a while (polls.py)."""
        self._item_json = None
        self.req = None
        self.verdict = None
        if not keep_prompt:
            self.prompt = None


class TaskQueue:
    """Pending tasks in ComfyUI's priority order: lower `number` first, then arrival."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._tasks: dict[str, Task] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._tasks

    def get(self, prompt_id: str) -> Task | None:
        return self._tasks.get(prompt_id)

    def resume_after(self, seq: int) -> None:
        """New tasks sort after `seq` (tasks restored from an earlier run)."""
        self._seq = itertools.count(seq + 1)

    def next_seq(self) -> int:
        """The arrival number of a task about to be pushed (it is stored before it is queued)."""
        return next(self._seq)

    def push(self, task: Task, *, keep_seq: bool = False) -> None:
        if not keep_seq:
            task.seq = next(self._seq)
        self._tasks[task.prompt_id] = task
        heapq.heappush(self._heap, (task.number, task.seq, task.prompt_id))

    def remove(self, prompt_id: str) -> Task | None:
        # Lazy deletion: the heap entry is skipped when it surfaces, and the heap is
        # rebuilt once such dead entries outnumber the live ones.
        task = self._tasks.pop(prompt_id, None)
        if len(self._heap) > 2 * len(self._tasks) + 64:
            self._heap = [(t.number, t.seq, t.prompt_id) for t in self._tasks.values()]
            heapq.heapify(self._heap)
        return task

    def __iter__(self) -> Iterator[Task]:
        """Live tasks in priority order (sorting a copy; the heap stays untouched)."""
        for _, _, pid in sorted(self._heap):
            task = self._tasks.get(pid)
            if task is not None and task.state == QUEUED:
                yield task

    def ordered(self) -> Iterator[Task]:
        """Live tasks in priority order, lazily: cheap when only the first few are wanted."""
        heap = list(self._heap)
        while heap:
            _, seq, pid = heapq.heappop(heap)
            task = self._tasks.get(pid)
            if task is not None and task.seq == seq:
                yield task


class Numbering:
    """ComfyUI's `number` semantics for POST /prompt (server.py post_prompt)."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def assign(self, number: Any = None, front: Any = False) -> float | int:
        """ValueError for a number that is not one: NaN, an infinity, 1e999, "inf" or an
        integer too large for a float (ComfyUI takes those; its JSON answers then break)."""
        if number is not None:
            try:
                value = float(number)
            except OverflowError:
                raise ValueError(f"number out of range: {number!r:.40}") from None
            if not math.isfinite(value):
                raise ValueError(f"number must be finite, got {number!r:.40}")
            return value
        n = self.next
        self.next += 1
        return -n if front else n
