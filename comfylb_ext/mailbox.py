"""Results for clients that are away: a prompt that ends while its client has no socket
(a restart of either side, a dropped connection) keeps its final messages here until a
socket with that client id connects again.  Bounded in clients, messages and time.

Results just sent are remembered a little while too (Sent): a coordinator standing by
that dies takes with it what it was passing on, so those go again to its clients."""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

KEPT = frozenset({"executed", "execution_success", "execution_error", "execution_interrupted"})  # + executing null
PER_CLIENT = 64
CLIENTS = 10000
TTL = 600.0  # seconds


class Mailbox:
    def __init__(self, ttl: float = TTL) -> None:
        self.ttl = ttl
        self._boxes: OrderedDict[str, tuple[float, deque[tuple[str, Any]]]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._boxes)

    def keep(self, client_id: str, event: str, data: Any) -> None:
        self._expire()
        _, box = self._boxes.pop(client_id, (0.0, deque(maxlen=PER_CLIENT)))
        box.append((event, data))
        self._boxes[client_id] = (time.monotonic() + self.ttl, box)
        while len(self._boxes) > CLIENTS:
            self._boxes.popitem(last=False)

    def waiting(self) -> list[str]:
        self._expire()
        return list(self._boxes)

    def take(self, client_id: str) -> list[tuple[str, Any]]:
        entry = self._boxes.pop(client_id, None)
        return list(entry[1]) if entry and entry[0] > time.monotonic() else []

    def _expire(self) -> None:
        now = time.monotonic()
        while self._boxes and next(iter(self._boxes.values()))[0] <= now:
            self._boxes.popitem(last=False)


SENT_FOR = 5.0  # seconds a result sent is remembered


class Sent:
    """The results sent to each client in the last SENT_FOR seconds."""

    def __init__(self) -> None:
        self._sent: OrderedDict[str, deque[tuple[float, str, Any]]] = OrderedDict()

    def note(self, client_id: str, event: str, data: Any) -> None:
        now = time.monotonic()
        box = self._sent.pop(client_id, None) or deque(maxlen=PER_CLIENT)
        box.append((now, event, data))
        self._sent[client_id] = box
        while self._sent and (len(self._sent) > CLIENTS or next(iter(self._sent.values()))[-1][0] < now - SENT_FOR):
            self._sent.popitem(last=False)

    def since(self, client_id: str, seconds: float) -> list[tuple[str, Any]]:
        """What the client was sent in the last `seconds`."""
        after = time.monotonic() - seconds
        return [(event, data) for at, event, data in self._sent.get(client_id, ()) if at >= after]
