"""What going through ComfyLB costs, against the same real ComfyUI peer driven directly.

    .venv/bin/python bench/overhead.py [--n 200]

- POST /prompt latency (ComfyLB answers once the prompt is queued; ComfyUI once validated
  and queued);
- GET /view of a ~4 MB image: throughput through ComfyLB's stream against direct;
- websocket relay: from the peer's own timestamp on execution_start/execution_success to
  the client receiving it, through ComfyLB against a client on the peer itself.
Runs interleave so machine noise hits both sides alike; prints ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import procs  # noqa: E402
from tests.client import Client, invert_prompt, sleep_prompt  # noqa: E402


def noise_png(side: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    raw = b"".join(b"\x00" + os.urandom(side * 3) for _ in range(side))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


def p50(xs):
    return statistics.median(xs)


async def post_latency(url_lb: str, url_peer: str, n: int) -> tuple[list[float], list[float]]:
    lb, direct = [], []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            for url, out in ((url_lb, lb), (url_peer, direct)):
                body = {"prompt": invert_prompt("ovh"), "client_id": "bench"}
                t0 = time.perf_counter()
                async with s.post(url + "/prompt", json=body) as r:
                    await r.read()
                    assert r.status == 200
                out.append((time.perf_counter() - t0) * 1000)
    return lb, direct


async def view_throughput(urls: list[str], params: dict, size: int, n: int) -> list[float]:
    """Median MB/s of each URL's /view, the URLs taking turns."""
    times: dict[str, list[float]] = {u: [] for u in urls}
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            for url in urls:
                t0 = time.perf_counter()
                async with s.get(url + "/view", params=params) as r:
                    body = await r.read()
                assert r.status == 200 and len(body) == size
                times[url].append(time.perf_counter() - t0)
    return [size / p50(times[u]) / 1e6 for u in urls]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="comfylb-bench-"))
    env = procs.comfyui_env()
    peer = procs.start_comfyui(env, "peer", work)
    lb = relay_lb = None
    try:
        peer.wait_ready("/system_stats", 180)
        lb = procs.start_balancer(work, "lb", [{"name": "peer", "port": peer.port, "max_queue": 1000}])
        # the same, keeping no copies: every /view is relayed from the peer
        relay_lb = procs.start_balancer(work, "relay", [{"name": "peer", "port": peer.port, "max_queue": 1000}],
                                     storage={"dir": str(work / "relay-data"), "view_cache_mb": 0})
        for b in (lb, relay_lb):
            b.wait_ready("/system_stats", 30)
            procs.wait_backends(b, {"peer"})
        lb_post, direct_post = await post_latency(lb.url, peer.url, args.n)

        image = noise_png(1200)
        async with Client(lb.url) as c:
            form = aiohttp.FormData()
            form.add_field("image", image, filename="noise.png")
            await c.post("/upload/image", data=form)
            run = await c.run({"1": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
                               "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}}})
            out = run.first("executed")["output"]["images"][0]
        async with aiohttp.ClientSession() as s:
            async with s.get(peer.url + "/view", params=out) as r:
                size = len(await r.read())
        async with Client(relay_lb.url) as c:  # let the relaying balancer learn where the file is
            await c.run({"1": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
                         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}}})
        lb_mbs, relay_mbs, direct_mbs = await view_throughput([lb.url, relay_lb.url, peer.url], out, size, 60)

        relay = {}
        for name, base in (("comfylb", lb.url), ("direct", peer.url)):
            samples = []
            async with Client(base) as c:
                for _ in range(10):
                    status, body, run = await c.queue(sleep_prompt(0.05, "relay"))
                    await run.done.wait()
                    samples += [t for t in run.latency_ms]
            relay[name] = samples
    finally:
        for b in (lb, relay_lb):
            if b:
                b.stop()
        peer.stop()
    print(f"POST /prompt p50: comfylb {p50(lb_post):.2f} ms, direct {p50(direct_post):.2f} ms "
          f"(added {p50(lb_post) - p50(direct_post):+.2f} ms, ratio {p50(lb_post) / p50(direct_post):.2f})")
    print(f"GET /view {size / 1e6:.1f} MB: relayed from the peer {relay_mbs:.0f} MB/s (ratio {relay_mbs / direct_mbs:.2f}), "
          f"from the copy comfylb took when the peer announced it {lb_mbs:.0f} MB/s (ratio {lb_mbs / direct_mbs:.2f}), direct {direct_mbs:.0f} MB/s")
    print(f"websocket relay, peer timestamp to client: comfylb p50 {p50(relay['comfylb']):.1f} ms, "
          f"direct p50 {p50(relay['direct']):.1f} ms (added {p50(relay['comfylb']) - p50(relay['direct']):+.1f} ms)")


if __name__ == "__main__":
    asyncio.run(main())
