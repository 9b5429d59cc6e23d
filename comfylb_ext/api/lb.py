"""The `/lb/*` management API (JSON in and out, clear 4xx errors)."""
from __future__ import annotations

import time
from typing import Awaitable, Callable

from aiohttp import web

from ..dispatcher import Cluster

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LbApi:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/lb/backends", self.backends),
            ("GET", "/lb/stats", self.stats),
        ]

    async def backends(self, request: web.Request) -> web.Response:
        return web.json_response({"backends": [p.describe() for p in self.cluster.peers.values()]})

    async def stats(self, request: web.Request) -> web.Response:
        c = self.cluster
        return web.json_response({
            "uptime": time.time() - c.started_at,
            "totals": {k: c.counts.get(k, 0) for k in ("submitted", "completed", "failed", "cancelled", "retried")},
            "queued": len(c.queue),
            "running": sum(1 for t in c.tasks.values() if t.state == "running"),
            "in_flight": sum(len(p.inflight) for p in c.peers.values()),
            "backends": {p.name: {"inflight": len(p.inflight), "jobs_done": p.jobs_done,
                                  "mean_job_time": p.mean_job_time} for p in c.peers.values()},
        })
