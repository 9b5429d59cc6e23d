"""The delivery delay that ordered delivery adds, against real ComfyUI peers.

    .venv/bin/python bench/delivery.py [--rounds 5] [--peers 3]

One client queues 4 prompts at once (TestSleep of different lengths, so they finish out
of order on 3 peers) and waits for all; this repeats for a number of rounds, through
two standalone balancers over the same peers, side by side:
  interleaved — server.ordered_delivery false: every message as it comes;
  ordered     — the default: one prompt's messages at a time, in queue order.
For each prompt, the delay is from the peer's own execution_success timestamp to the
moment the client receives that prompt's final `executing {node: null}`.  The difference
between the two is what a client written for one ComfyUI waits in exchange for seeing
the prompts one at a time.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import procs  # noqa: E402
from tests.client import Client, sleep_prompt  # noqa: E402

DURATIONS = (1.2, 0.3, 0.8, 0.1)  # queue order; they end in another order on 3 peers


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def one_round(url: str) -> tuple[list[float], float]:
    """(each prompt's delay in ms, the round's wall time in s)."""
    async with Client(url) as c:
        t0 = time.perf_counter()
        runs = [(await c.queue(sleep_prompt(d, "delivery")))[2] for d in DURATIONS]
        ended: dict[str, float] = {}

        async def watch(run) -> None:
            await run.done.wait()
            ended[run.prompt_id] = time.time() * 1000
        await asyncio.gather(*(watch(r) for r in runs))
        wall = time.perf_counter() - t0
    return [ended[r.prompt_id] - r.first("execution_success")["timestamp"] for r in runs], wall


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peers", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="comfylb-bench-"))
    env = procs.comfyui_env()
    peers = [procs.start_comfyui(env, f"peer{i}", work) for i in range(args.peers)]
    results: dict[str, tuple[list[float], list[float]]] = {"interleaved": ([], []), "ordered": ([], [])}
    try:
        for p in peers:
            p.wait_ready("/system_stats", 180)
        backends = [{"name": p.name, "port": p.port, "max_queue": 1} for p in peers]
        with procs.running_balancer(work, "interleaved", backends, server={"ordered_delivery": False}) as a, \
                procs.running_balancer(work, "ordered", backends) as b:
            await one_round(b.url)  # warm-up: first prompts load nodes
            for _ in range(args.rounds):  # alternate, so both see the same machine
                for name, lb in (("interleaved", a), ("ordered", b)):
                    delays, wall = await one_round(lb.url)
                    results[name][0].extend(delays)
                    results[name][1].append(wall)
    finally:
        for p in peers:
            p.stop()
    print(f"{args.rounds} rounds of 4 prompts ({', '.join(map(str, DURATIONS))} s) from one client over "
          f"{args.peers} real ComfyUI peers")
    print(f"{'':13}{'delay p50':>11}{'delay p95':>11}{'round p50':>11}")
    for name, (delays, walls) in results.items():
        print(f"{name:13}{pct(delays, .5):>9.0f}ms{pct(delays, .95):>9.0f}ms{pct(walls, .5):>10.2f}s")
    (d_i, w_i), (d_o, w_o) = results["interleaved"], results["ordered"]
    print(f"added by ordered delivery: p50 {pct(d_o, .5) - pct(d_i, .5):+.0f} ms, "
          f"p95 {pct(d_o, .95) - pct(d_i, .95):+.0f} ms; round time ratio {pct(w_o, .5) / pct(w_i, .5):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
