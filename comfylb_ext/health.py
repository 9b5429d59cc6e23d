"""Health checking: active checks with hysteresis, separate from passive link loss.

`HealthState` is the pure state machine (Envoy/HAProxy style: a peer turns unhealthy
only after `unhealthy_threshold` consecutive failed checks and healthy again after
`healthy_threshold` consecutive successes).  `HealthChecker` runs the checks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from .config import HealthCheckConfig

log = logging.getLogger(__name__)

UNKNOWN, HEALTHY, UNHEALTHY = "unknown", "healthy", "unhealthy"


@dataclass
class HealthState:
    state: str = UNKNOWN
    successes: int = 0
    failures: int = 0
    last_error: str | None = None
    changed_at: float = field(default_factory=time.time)
    checked_at: float | None = None

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY

    def record(self, ok: bool, cfg: HealthCheckConfig, error: str | None = None,
               now: float | None = None) -> bool:
        """Count one check result; True when the state changed."""
        now = time.time() if now is None else now
        self.checked_at = now
        if ok:
            self.successes += 1
            self.failures = 0
            # A peer never seen before needs only one good check to start taking work.
            need = 1 if self.state == UNKNOWN else cfg.healthy_threshold
            if self.state != HEALTHY and self.successes >= need:
                return self._to(HEALTHY, now)
        else:
            self.failures += 1
            self.successes = 0
            self.last_error = error
            need = 1 if self.state == UNKNOWN else cfg.unhealthy_threshold
            if self.state != UNHEALTHY and self.failures >= need:
                return self._to(UNHEALTHY, now)
        return False

    def _to(self, state: str, now: float) -> bool:
        self.state = state
        self.changed_at = now
        return True


class HealthChecker:
    """Runs `check(peer)` for every peer each `interval`, all peers at once."""

    def __init__(self, cfg: HealthCheckConfig, peers: Callable[[], Iterable],
                 check: Callable[[Any], Awaitable[None]]) -> None:
        self.cfg = cfg
        self._peers = peers
        self._check = check
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="comfylb-health")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(p) for p in list(self._peers())), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.check_all()
            except Exception:  # never let one bad round stop health checking
                log.exception("health check round failed")
            await asyncio.sleep(max(0.0, self.cfg.interval - (time.monotonic() - started)))
