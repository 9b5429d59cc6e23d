"""Screenshots of the standalone page at full width (the panel beside the cluster at a
glance, web/js/cluster.js) for the README: the balancer in this process over four
SIMULATED peers kept busy for a while, in Debian's headless chromium as the browser tests
drive it.

    .venv/bin/python scripts/screenshots.py [--out docs] [--seconds 45]

writes cluster-page.png (dark) and cluster-page-light.png into --out.  One simulated peer
runs at half speed (a straggler), one is disabled (idle), one lacks a checkpoint the others
have, and the copy shown in progress is made up for the picture: it is added to the pushes
here, as the balancer has nothing to copy between simulated peers.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from playwright.async_api import async_playwright  # noqa: E402

from tests.client import Client, sleep_prompt  # noqa: E402
from tests.integration.conftest import ARGS, CHROMIUM  # noqa: E402
from tests.simcluster import lb_over_sims  # noqa: E402

SIMS = [{"checkpoints": ["sdxl.safetensors", "flux.safetensors"]},
        {"checkpoints": ["sdxl.safetensors", "flux.safetensors"]},
        {"checkpoints": ["sdxl.safetensors"]},  # lacks flux: a copy of it is shown in progress
        {"checkpoints": ["sdxl.safetensors", "flux.safetensors"], "slowdown": 2.0}]  # half as fast


def with_a_copy(cluster, started: float):
    """cluster.snapshot with one copy to sim2 in progress (an illustration, see above)."""
    plain = cluster.snapshot
    total = 6_900_000_000

    def snapshot() -> dict:
        done = min(total - 1, int(total * (time.monotonic() - started) / 120))
        return {**plain(), "transfers": [
            {"id": "t1", "peer": "sim2", "folder": "checkpoints", "name": "flux.safetensors", "source": "sim0",
             "done": done, "total": total, "state": "copying", "error": None}]}
    return snapshot


async def keep_busy(url: str, seconds: float) -> None:
    """Prompts of 1-6 s, a few at a time, so the queue fills and drains."""
    rng = random.Random(15)
    async with Client(url) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(rng.choice((1, 1, 2, 3))):
                await c.queue(sleep_prompt(rng.uniform(1.0, 6.0), "shot"))
            await asyncio.sleep(rng.uniform(1.5, 4.0))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--seconds", type=float, default=45.0, help="how long the peers are kept busy first")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    async with lb_over_sims(4, max_queue=1, sim_kw=SIMS) as (url, sims, cluster):
        cluster.snapshot = cluster.notify.snapshot = with_a_copy(cluster, time.monotonic())
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = await browser.new_page(viewport={"width": 1440, "height": 860})
            await page.goto(url + "/?theme=dark")
            await page.locator("#cluster .cc-span").select_option("1")
            busy = asyncio.ensure_future(keep_busy(url, args.seconds + 60))
            await asyncio.sleep(args.seconds * 0.6)
            cluster.set_enabled("sim1", False)  # idle from here on: an empty lane
            await asyncio.sleep(args.seconds * 0.4)
            await page.locator(".cc-job.cc-running").first.wait_for(timeout=30000)
            await page.screenshot(path=str(out / "cluster-page.png"))
            await page.locator("#theme").click()
            await page.screenshot(path=str(out / "cluster-page-light.png"))
            await browser.close()
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
    for name in ("cluster-page.png", "cluster-page-light.png"):
        print(f"{out / name}: {(out / name).stat().st_size // 1024} KB")


if __name__ == "__main__":
    asyncio.run(main())
