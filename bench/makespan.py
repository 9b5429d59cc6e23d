"""Makespan and model loads over SIMULATED peers, each comparison side by side in one run.

    .venv/bin/python bench/makespan.py [--prompts 30] [--load 1.0]

1. equal peers: 30 mixed prompts (0.3-1.5 s) over 3 peers, against the ideal
   (total work / peers, or the longest prompt);
2. unequal peers (1x, 2x, 4x slower): least_busy (moving-average job time), plain
   round_robin, and least_busy with order longest_first, against the ideal (total work /
   total speed);
3. model affinity: two checkpoints alternating over four peers, each load costing --load
   seconds: model loads and makespan with affinity and with plain least_busy;
4. cache affinity: prompts sent again once done (a user re-queueing), over three peers:
   how many ComfyUI served from its cache, with affinity and with plain least_busy.
Simulated peers stand in where the point is scheduling, not protocol; ratios, not times.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.client import Client, sleep_prompt  # noqa: E402
from tests.simcluster import lb_over_sims  # noqa: E402


async def run_batch(url: str, prompts: list[dict]) -> float:
    async with Client(url) as c:
        t0 = time.perf_counter()
        runs = [(await c.queue(p))[2] for p in prompts]
        await asyncio.gather(*(r.done.wait() for r in runs))
        return time.perf_counter() - t0


def ckpt_prompt(ckpt: str, seconds: float, i: int) -> dict:
    # TestSleep stands for sampling with the model: it depends on the loader, so the loader
    # runs (or is served from the peer's cache when the peer's last prompt used it too).
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "3": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds, "seed": i}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "aff"}}}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--load", type=float, default=1.0, help="seconds to load a checkpoint")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    durations = [round(rnd.uniform(0.3, 1.5), 2) for _ in range(args.prompts)]
    work = sum(durations)

    ideal = max(work / 3, max(durations))
    equal = {}
    for order in ("fifo", "longest_first"):
        async with lb_over_sims(3, max_queue=1, scheduler={"order": order}) as (url, sims, cluster):
            equal[order] = await run_batch(url, [sleep_prompt(d) for d in durations])
    print(f"1. equal peers, {args.prompts} prompts: ideal {ideal:.2f} s; " + ", ".join(
        f"order {k} {v:.2f} s (ratio {v / ideal:.3f})" for k, v in equal.items()))

    slow = [{"slowdown": 1.0}, {"slowdown": 2.0}, {"slowdown": 4.0}]
    ideal_u = max(work / (1 + 1 / 2 + 1 / 4), max(durations))
    for max_queue in (1, 2):
        results = {}
        for strategy, order in (("least_busy", "fifo"), ("round_robin", "fifo"), ("least_busy", "longest_first")):
            async with lb_over_sims(3, max_queue=max_queue, sim_kw=slow,
                                    scheduler={"strategy": strategy, "order": order}) as (url, sims, cl):
                results[f"{strategy}/{order}"] = await run_batch(url, [sleep_prompt(d) for d in durations])
        print(f"2. peers 1x/2x/4x slower, max_queue {max_queue}: ideal {ideal_u:.2f} s; " + ", ".join(
            f"{k} {v:.2f} s (ratio {v / ideal_u:.3f})" for k, v in results.items()))

    loads, spans = {}, {}
    prompts = [ckpt_prompt(("a" if i % 2 else "b") + ".safetensors", round(rnd.uniform(0.2, 0.8), 2), i)
               for i in range(40)]
    for affinity in (False, True):
        kw = [{"model_load": args.load, "checkpoints": ["a.safetensors", "b.safetensors"]}] * 4
        async with lb_over_sims(4, max_queue=1, sim_kw=kw, scheduler={"affinity": affinity}) as (url, sims, cl):
            spans[affinity] = await run_batch(url, prompts)
            loads[affinity] = sum(s.sim.model_loads for s in sims)
    print(f"3. two checkpoints alternating over four peers (load {args.load} s): model loads "
          f"{loads[False]} plain -> {loads[True]} with affinity ({1 - loads[True] / loads[False]:.0%} fewer); "
          f"makespan {spans[False]:.2f} s -> {spans[True]:.2f} s (ratio {spans[True] / spans[False]:.3f})")

    served, took = {}, {}
    for affinity in (False, True):
        async with lb_over_sims(3, max_queue=1, scheduler={"affinity": affinity}) as (url, sims, cl):
            served[affinity], took[affinity] = await repeats(url, 10, random.Random(args.seed))
    print(f"4. 10 prompts each sent again once done, three peers: served from cache {served[False]}/10 plain -> "
          f"{served[True]}/10 with affinity; time {took[False]:.2f} s -> {took[True]:.2f} s "
          f"(ratio {took[True] / took[False]:.3f})")


async def repeats(url: str, rounds: int, rnd: random.Random) -> tuple[int, float]:
    """Each round a new prompt, then the same again once it is done: (repeats served
    whole from the peer's cache, seconds)."""
    served = 0
    async with Client(url) as c:
        t0 = time.perf_counter()
        for _ in range(rounds):
            prompt = sleep_prompt(round(rnd.uniform(0.2, 0.6), 2))
            await c.run(prompt)
            again = await c.run(prompt)
            served += sorted(again.first("execution_cached")["nodes"]) == sorted(prompt)
        return served, time.perf_counter() - t0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main())
