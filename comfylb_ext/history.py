"""Coordinator-wide history, as ComfyUI's PromptQueue keeps it (pure data, no I/O).

Entries are kept in completion order and numbered in completion order: ComfyUI's frontend
only appends history items whose `prompt[0]` is larger than the newest it has seen, so with
parallel peers the number must grow with completion, not with submission (checked on a live server).
"""
from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Iterator

from . import jobs

MAXIMUM_HISTORY_SIZE = 10000


class History:
    def __init__(self, max_size: int = MAXIMUM_HISTORY_SIZE) -> None:
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self.max_size = max_size
        self.counter = 0
        self._jobs: dict[str, dict] = {}  # the jobs API's view of each entry, made once: entries never change

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._entries

    def add(self, prompt_id: str, entry: dict) -> dict:
        """Store an entry (ComfyUI's shape); its `prompt[0]` becomes the next completion number."""
        entry = dict(entry)
        prompt = list(entry.get("prompt") or [])
        if prompt:
            prompt[0] = self.counter
        entry["prompt"] = prompt
        self.counter += 1
        self._entries.pop(prompt_id, None)
        self._jobs.pop(prompt_id, None)
        self._entries[prompt_id] = entry
        while len(self._entries) > self.max_size:
            self._jobs.pop(self._entries.popitem(last=False)[0], None)
        return entry

    def jobs(self) -> Iterator[dict]:
        """Every entry as GET /api/jobs lists it."""
        for pid, entry in self._entries.items():
            job = self._jobs.get(pid)
            if job is None:
                job = self._jobs[pid] = jobs.history_job(pid, entry)
            yield job

    def restore(self, prompt_id: str, position: int, entry: dict) -> None:
        """Put back an entry saved earlier, keeping its number."""
        self._entries[prompt_id] = entry
        self.counter = max(self.counter, position + 1)

    def get(self, prompt_id: str) -> dict | None:
        entry = self._entries.get(prompt_id)
        return copy.deepcopy(entry) if entry is not None else None

    def items(self, max_items: int | None = None, offset: int = -1) -> dict:
        """GET /history: ComfyUI's PromptQueue.get_history paging, to the letter."""
        out: dict[str, dict] = {}
        if offset < 0 and max_items is not None:
            offset = len(self._entries) - max_items
        for i, (k, v) in enumerate(self._entries.items()):
            if i >= offset:
                out[k] = v
                if max_items is not None and len(out) >= max_items:
                    break
        return copy.deepcopy(out)

    def peek(self, prompt_id: str) -> dict | None:
        """An entry, not copied: the caller must not change it (entries never change once
        added, so it may be encoded in another thread)."""
        return self._entries.get(prompt_id)

    def page(self, max_items: int | None = None, offset: int = -1) -> dict:
        """items(), not copied (see peek): a large history is encoded off the event loop."""
        if offset < 0 and max_items is not None:
            offset = len(self._entries) - max_items
        start = max(offset, 0)
        stop = None if max_items is None else start + max(max_items, 1)  # as ComfyUI: never fewer than one
        return dict(itertools.islice(self._entries.items(), start, stop))

    def delete(self, prompt_id: str) -> None:
        self._entries.pop(prompt_id, None)
        self._jobs.pop(prompt_id, None)

    def clear(self) -> None:
        self._entries.clear()
        self._jobs.clear()
