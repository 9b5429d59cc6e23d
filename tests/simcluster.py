"""The balancer in-process over simulated peers, for fast tests of coordinator logic."""
from __future__ import annotations

import asyncio
import contextlib
import tempfile

from aiohttp import web

from comfylb_ext.config import BackendConfig, parse
from comfylb_ext.hosts.standalone import CLUSTER, build_app
from comfylb_ext.sim import start_sim


async def start_balancer(backends: list[BackendConfig], storage_dir: str | None = None, **sections):
    """The standalone balancer in this process over `backends`: (runner, cluster, url).
    The same `storage_dir` again is a restart."""
    raw = {"health_check": {"interval": 0.5, "timeout": 1.0, "unhealthy_threshold": 1},
           "storage": {"dir": storage_dir or tempfile.mkdtemp(prefix="comfylb-unit-")}, **sections}
    cfg = parse(raw)
    cfg.backends = backends
    app = build_app(cfg)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, app[CLUSTER], f"http://127.0.0.1:{runner.addresses[0][1]}"


def sim_backends(sims: list, max_queue: int = 1) -> list[BackendConfig]:
    return [BackendConfig(name=f"sim{i}", port=s.port, max_queue=max_queue) for i, s in enumerate(sims)]


@contextlib.asynccontextmanager
async def lb_over_sims(n: int = 2, max_queue: int = 1, sim_kw: list[dict] | None = None, **sections):
    sims = [await start_sim(name=f"sim{i}", **((sim_kw or [{}] * n)[i])) for i in range(n)]
    runner, cluster, url = await start_balancer(sim_backends(sims, max_queue), **sections)
    try:
        await wait_for(lambda: all(p.available for p in cluster.peers.values()), cluster)
        yield url, sims, cluster
    finally:
        await runner.cleanup()
        for s in sims:
            await s.stop()


async def wait_for(cond, *sources, timeout: float = 10.0) -> None:
    """Wait until `cond()` holds, checking it again whenever one of `sources` (a Cluster,
    a Sim) says its state changed."""
    async def wait() -> None:
        while not cond():
            # the events are taken before yielding: a change from here on sets one of them
            events = [s.state_changed for s in sources]
            waits = [asyncio.ensure_future(e.wait()) for e in events]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
    await asyncio.wait_for(wait(), timeout)
