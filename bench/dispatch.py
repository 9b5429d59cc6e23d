"""Dispatch gap and makespan against real ComfyUI peers, side by side with a baseline.

    .venv/bin/python bench/dispatch.py [--prompts 30] [--peers 3]

Runs, in one go:
  direct   — each peer driven directly by an ideal client (next prompt sent the moment the
             previous one's execution_success arrives; prompts split evenly in advance);
  lbN      — the same prompts through the standalone balancer with max_queue N (1: every
             prompt waits in the coordinator until a peer frees up), in queue order;
  lbN/lf   — the same with scheduler.order longest_first.
Gaps come from the peers' own history timestamps (execution_success of one prompt to
execution_start of the next on the same peer).  Prints ratios; absolute times on a shared
2-core machine mean little.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import procs  # noqa: E402
from tests.client import Client, sleep_prompt  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def gaps_from_history(peer_urls: list[str], ids: set[str]) -> tuple[list[float], list[float]]:
    """Idle gaps between consecutive prompts on each peer, and every prompt's run time
    (ms, from the peers' own execution_start and execution_success timestamps)."""
    gaps, runs = [], []
    async with aiohttp.ClientSession() as s:
        for url in peer_urls:
            async with s.get(url + "/history") as r:
                hist = await r.json()
            spans = []
            for pid, e in hist.items():
                if pid not in ids:
                    continue
                msgs = dict((m[0], m[1]) for m in e["status"]["messages"])
                spans.append((msgs["execution_start"]["timestamp"], msgs["execution_success"]["timestamp"]))
            spans.sort()
            gaps += [(b[0] - a[1]) for a, b in zip(spans, spans[1:])]
            runs += [b - a for a, b in spans]
    return gaps, runs


async def run_direct(peers, durations) -> tuple[float, list[float], list[float]]:
    shares = [durations[i::len(peers)] for i in range(len(peers))]
    ids: set[str] = set()

    async def drive(peer, share):
        async with Client(peer.url) as c:
            for d in share:
                run = await c.run(sleep_prompt(d, "bench"))
                ids.add(run.prompt_id)
    t0 = time.perf_counter()
    await asyncio.gather(*(drive(p, s) for p, s in zip(peers, shares)))
    return (time.perf_counter() - t0, *await gaps_from_history([p.url for p in peers], ids))


async def run_lb(lb, peers, durations) -> tuple[float, list[float], list[float]]:
    async with Client(lb.url) as c:
        t0 = time.perf_counter()
        runs = [(await c.queue(sleep_prompt(d, "bench")))[2] for d in durations]
        await asyncio.gather(*(r.done.wait() for r in runs))
        wall = time.perf_counter() - t0
    return (wall, *await gaps_from_history([p.url for p in peers], {r.prompt_id for r in runs}))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    durations = [round(rnd.uniform(0.3, 1.5), 2) for _ in range(args.prompts)]
    ideal = sum(durations) / args.peers
    work = Path(tempfile.mkdtemp(prefix="comfylb-bench-"))
    env = procs.comfyui_env()
    peers = [procs.start_comfyui(env, f"peer{i}", work) for i in range(args.peers)]
    try:
        for p in peers:
            p.wait_ready("/system_stats", 180)
        await run_direct(peers, [0.05] * args.peers)  # warm-up: first prompts load nodes
        d_wall, d_gaps, d_runs = await run_direct(peers, durations)
        results = []
        for order in ("fifo", "longest_first"):
            for max_queue in (1, 2):
                name = f"lb{max_queue}" + ("" if order == "fifo" else "/lf")
                with procs.running_balancer(work, name.replace("/", "-"), [
                        {"name": p.name, "port": p.port, "max_queue": max_queue} for p in peers],
                        scheduler={"order": order}) as lb:
                    results.append((name, *await run_lb(lb, peers, durations)))
    finally:
        for p in peers:
            p.stop()
    print(f"{args.prompts} TestSleep prompts of 0.3-1.5 s over {args.peers} real ComfyUI peers; "
          f"{sum(durations):.1f} s of sleep, ideal makespan {ideal:.2f} s")
    print(f"{'':12}{'gap p50':>10}{'gap p99':>10}{'makespan':>10}{'vs ideal':>10}{'vs ideal*':>10}")
    for name, wall, gaps, runs in (("direct", d_wall, d_gaps, d_runs), *results):
        work = max(sum(runs) / 1000 / args.peers, max(runs) / 1000)
        print(f"{name:12}{pct(gaps, .5):>8.0f}ms{pct(gaps, .99):>8.0f}ms{wall:>9.2f}s{wall / ideal:>10.3f}"
              f"{wall / work:>10.3f}")
    print("(ideal*: from the run times the peers themselves recorded, ComfyUI's own per-prompt work "
          "included: what a perfect scheduler could reach)")
    for name, wall, gaps, runs in results:
        print(f"{name} / direct: gap p50 {pct(gaps, .5):.0f} vs {pct(d_gaps, .5):.0f} ms, makespan ratio "
              f"{wall / d_wall:.3f}; mean gap {statistics.mean(gaps):.1f} ms")
    print("(lbN: max_queue N per peer; /lf: scheduler.order longest_first; gaps are the peers' own "
          "execution_success -> next execution_start)")


if __name__ == "__main__":
    asyncio.run(main())
