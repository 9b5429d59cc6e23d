"""Scale: 10,000 queued prompts over 100 SIMULATED peers.

    .venv/bin/python bench/scale.py [--peers 100] [--prompts 10000]

The balancer runs as its own process (its memory and CPU time are read from /proc); the
simulated peers share this one.  Phase 1 holds every peer busy and queues the rest, then
reads the coordinator's resident memory and times GET /queue, GET /lb/stats and
POST /prompt; phase 2 runs quick prompts through and divides the coordinator's CPU time
by the prompts dispatched.  Prints figures side by side with the same calls on an empty
balancer, as ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from comfylb_ext.sim import start_sim  # noqa: E402
from tests import procs  # noqa: E402
from tests.client import invert_prompt, sleep_prompt  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed(s: aiohttp.ClientSession, method: str, url: str, n: int = 15, **kw) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with s.request(method, url, **kw) as r:
            await r.read()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def wait_available(s, url: str, n: int) -> None:
    while True:
        async with s.get(url + "/lb/backends") as r:
            if sum(b["available"] for b in (await r.json())["backends"]) >= n:
                return
        await asyncio.sleep(0.2)  # startup only: peers link within a second or two


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=10000)
    ap.add_argument("--quick", type=int, default=2000, help="prompts run through in phase 2")
    ap.add_argument("--order", default="fifo", choices=("fifo", "longest_first"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="comfylb-scale-"))
    sims = [await start_sim(name=f"s{i}") for i in range(args.peers)]
    lb = procs.start_balancer(work, "lb", [{"name": f"s{i}", "port": s.port, "max_queue": 1}
                                           for i, s in enumerate(sims)],
                              queue={"max_size": args.prompts + 100},
                              health_check={"interval": 5.0, "timeout": 3.0}, scheduler={"order": args.order})
    try:
        await asyncio.to_thread(lb.wait_ready, "/system_stats", 30)
        async with aiohttp.ClientSession() as s:
            await wait_available(s, lb.url, args.peers)
            pid = lb.popen.pid
            base = {"rss": rss_mb(pid), "queue": await timed(s, "GET", lb.url + "/queue"),
                    "stats": await timed(s, "GET", lb.url + "/lb/stats")}
            sem = asyncio.Semaphore(64)

            async def post(prompt):
                async with sem:
                    async with s.post(lb.url + "/prompt", json={"prompt": prompt}) as r:
                        assert r.status == 200, await r.text()

            t0 = time.perf_counter()
            await asyncio.gather(*(post(sleep_prompt(3600)) for _ in range(args.prompts)))
            submit = time.perf_counter() - t0
            loaded = {"rss": rss_mb(pid), "queue": await timed(s, "GET", lb.url + "/queue", n=5),
                      "stats": await timed(s, "GET", lb.url + "/lb/stats"),
                      "post": await timed(s, "POST", lb.url + "/prompt", json={"prompt": invert_prompt()})}
            async with s.get(lb.url + "/lb/stats") as r:
                stats = await r.json()
            await s.post(lb.url + "/queue", json={"clear": True})
            async with s.get(lb.url + "/api/jobs", params={"status": "in_progress,pending"}) as r:
                live = [j["id"] for j in (await r.json())["jobs"]]
            # an interrupt without an id stops one prompt, as on one ComfyUI: cancel each
            await s.post(lb.url + "/api/jobs/cancel", json={"job_ids": live})
            while True:  # let the interrupted prompts drain
                async with s.get(lb.url + "/prompt") as r:
                    if (await r.json())["exec_info"]["queue_remaining"] == 0:
                        break
                await asyncio.sleep(0.2)
            cpu0, t0 = cpu_seconds(pid), time.perf_counter()
            await asyncio.gather(*(post(invert_prompt("scale")) for _ in range(args.quick)))
            while True:
                async with s.get(lb.url + "/prompt") as r:
                    if (await r.json())["exec_info"]["queue_remaining"] == 0:
                        break
                await asyncio.sleep(0.1)
            cpu = cpu_seconds(pid) - cpu0
            wall = time.perf_counter() - t0
    finally:
        lb.stop()
        for sim in sims:
            await sim.stop()
    print(f"order {args.order}; {args.prompts} prompts over {args.peers} simulated peers: {stats['in_flight']} on peers, "
          f"{stats['queue_depth']} queued (submitted in {submit:.1f} s, {args.prompts / submit:.0f}/s)")
    print(f"coordinator memory: {loaded['rss']:.0f} MB resident (empty: {base['rss']:.0f} MB)")
    print(f"GET /queue p50 {loaded['queue']:.1f} ms (empty: {base['queue']:.2f} ms); "
          f"GET /lb/stats p50 {loaded['stats']:.2f} ms (empty: {base['stats']:.2f} ms); "
          f"POST /prompt p50 {loaded['post']:.2f} ms under that load")
    print(f"{args.quick} quick prompts through {args.peers} peers: coordinator CPU {cpu:.2f} s "
          f"= {cpu / args.quick * 1000:.2f} ms per prompt (dispatch, relay, history), wall {wall:.1f} s")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main())
