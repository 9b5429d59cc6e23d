"""The standalone balancer stopped as a service manager stops it: SIGTERM, with clients
connected and prompts queued."""
from __future__ import annotations

import asyncio
import signal

from aiohttp import WSCloseCode

from comfylb_ext.sim import start_sim
from tests import procs
from tests.client import Client, sleep_prompt


async def test_sigterm_with_clients_connected_exits_and_the_queued_prompts_survive(tmp_path):
    sim = await start_sim(name="sim0")  # in this process: it keeps running across the balancer's restart
    lb = procs.start_balancer(tmp_path, "lb", [{"name": "sim0", "host": "127.0.0.1", "port": sim.port, "max_queue": 1}])
    try:
        await asyncio.to_thread(lb.wait_ready, "/lb/state", 30)
        await asyncio.to_thread(procs.wait_backends, lb, {"sim0"})
        async with Client(lb.url) as c, Client(lb.url) as watcher:
            # the peer holds one; the rest wait in the coordinator
            ids = [(await c.queue(sleep_prompt(120)))[1]["prompt_id"] for _ in range(4)]
            lb.signal(signal.SIGTERM)
            assert await asyncio.to_thread(lb.popen.wait, 30) == 0, lb.tail()
            await asyncio.wait_for(asyncio.gather(c._reader, watcher._reader), 10)
            # told the server went away, as ComfyUI's web UI expects before it reconnects
            assert c.ws.close_code == watcher.ws.close_code == WSCloseCode.GOING_AWAY
        lb.restart()
        await asyncio.to_thread(lb.wait_ready, "/lb/state", 30)
        async with Client(lb.url) as c:
            _, queue = await c.get("/queue")
        pending = [item[1] for item in queue["queue_pending"]]
        assert set(ids[1:]) <= set(pending), (ids, queue)
        assert ids[0] in pending + [item[1] for item in queue["queue_running"]]
    finally:
        lb.stop()
        await sim.stop()
