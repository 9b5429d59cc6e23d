"""What going through ComfyLB costs, against the same real ComfyUI peer driven directly.

    .venv/bin/python bench/overhead.py [--n 200]

- POST /prompt latency (ComfyLB answers once the prompt is queued; ComfyUI once validated
  and queued);
- GET /view of a ~4 MB image against the peer's own /view: the first view, asked the
  moment `executed` arrives (what the web UI does); later views, served from the copy
  ComfyLB took; and every view relayed from the peer, as with `view_cache_mb: 0`;
- websocket relay: from the peer's own timestamp on execution_start/execution_success to
  the client receiving it, through ComfyLB against a client on the peer itself.
Runs interleave so machine noise hits both sides alike; prints ratios.

On one machine every hop is loopback, so a relay costs only CPU and shows at its worst.
`--link 1000` puts a paced relay (1000 Mbit/s, in this process) in front of the peer and
of each balancer: the peer and the coordinator on different machines of a gigabit LAN,
as a cluster of GPUs usually is.
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


async def paced_link(port: int, mbps: float) -> int:
    """A TCP relay to 127.0.0.1:port whose answers flow at `mbps` megabit/s; its port."""
    rate = mbps * 1e6 / 8

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, paced: bool) -> None:
        loop = asyncio.get_running_loop()
        free = loop.time()  # when the link has sent everything so far
        try:
            while data := await reader.read(1 << 16):
                if paced:
                    free = max(free, loop.time()) + len(data) / rate
                    if free > loop.time():
                        await asyncio.sleep(free - loop.time())  # the bytes are still on the wire
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        except asyncio.CancelledError:  # the bench is over
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1]


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


async def view_times(urls: list[str], params: dict, size: int, n: int) -> dict[str, list[float]]:
    """Seconds for each URL's /view of the same file, the URLs taking turns."""
    times: dict[str, list[float]] = {u: [] for u in urls}
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            for url in urls:
                t0 = time.perf_counter()
                async with s.get(url + "/view", params=params) as r:
                    body = await r.read()
                assert r.status == 200 and len(body) == size
                times[url].append(time.perf_counter() - t0)
    return times


def save_prompt(i: int) -> dict:
    # a new prefix each round: SaveImage runs again (not served from ComfyUI's cache) and
    # writes a new file
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"big{i}"}}}


async def first_view_times(urls: list[str], rounds: int) -> dict[str, list[float]]:
    """Seconds from a new image's `executed` event to having all of it, per URL in turns."""
    times: dict[str, list[float]] = {u: [] for u in urls}
    clients = [Client(u) for u in urls]
    async with aiohttp.ClientSession() as s:
        for c in clients:
            await c.__aenter__()
        try:
            for i in range(rounds):
                for url, c in zip(urls, clients):
                    _, _, run = await c.queue(save_prompt(i))
                    await c.until(lambda: "executed" in run.types())
                    image = run.first("executed")["output"]["images"][0]
                    t0 = time.perf_counter()
                    async with s.get(url + "/view", params=image) as r:
                        body = await r.read()
                    times[url].append(time.perf_counter() - t0)
                    assert r.status == 200 and len(body) > 1e6
                    await run.done.wait()
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)
    return times


def ratio(times: dict[str, list[float]], url: str, direct: str) -> float:
    """Throughput through `url` over direct: the median of the rounds' ratios, each
    round's pair taken moments apart so machine noise hits both alike."""
    return statistics.median(d / t for d, t in zip(times[direct], times[url]))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--link", type=float, default=0, help="Mbit/s of a paced link on every hop (0: loopback)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="comfylb-bench-"))
    env = procs.comfyui_env()
    peer = procs.start_comfyui(env, "peer", work)
    lb = relay_lb = None
    try:
        peer.wait_ready("/system_stats", 180)
        peer_port = await paced_link(peer.port, args.link) if args.link else peer.port
        lb = procs.start_balancer(work, "lb", [{"name": "peer", "port": peer_port, "max_queue": 1000}])
        # the same, keeping no copies: every /view is relayed from the peer
        relay_lb = procs.start_balancer(work, "relay", [{"name": "peer", "port": peer_port, "max_queue": 1000}],
                                     storage={"dir": str(work / "relay-data"), "view_cache_mb": 0})
        for b in (lb, relay_lb):  # in threads: the links run on this loop
            await asyncio.to_thread(b.wait_ready, "/system_stats", 30)
            await asyncio.to_thread(procs.wait_backends, b, {"peer"})
        # clients reach every server over a link too
        peer_url, lb_url, relay_url = [f"http://127.0.0.1:{await paced_link(p.port, args.link)}" if args.link
                                       else p.url for p in (peer, lb, relay_lb)]
        lb_post, direct_post = await post_latency(lb_url, peer_url, args.n)

        image = noise_png(1200)
        for base in (lb_url, peer_url):
            form = aiohttp.FormData()
            form.add_field("image", image, filename="noise.png", content_type="image/png")
            async with aiohttp.ClientSession() as s:
                async with s.post(base + "/upload/image", data=form) as r:
                    assert r.status == 200
        first = await first_view_times([lb_url, peer_url], 30)
        async with Client(lb_url) as c:
            out = (await c.run(save_prompt(-1))).first("executed")["output"]["images"][0]
        async with Client(relay_url) as c:  # ComfyUI serves the same prompt from its cache, same file
            assert (await c.run(save_prompt(-1))).first("executed")["output"]["images"][0] == out
        async with aiohttp.ClientSession() as s:
            async with s.get(peer_url + "/view", params=out) as r:
                size = len(await r.read())
        views = await view_times([lb_url, relay_url, peer_url], out, size, 100)

        relay = {}
        for name, base in (("comfylb", lb_url), ("direct", peer_url)):
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
    print(f"over {f'{args.link:g} Mbit/s links' if args.link else 'loopback'}:")
    print(f"POST /prompt p50: comfylb {p50(lb_post):.2f} ms, direct {p50(direct_post):.2f} ms "
          f"(added {p50(lb_post) - p50(direct_post):+.2f} ms, ratio {p50(lb_post) / p50(direct_post):.2f})")
    print(f"GET /view {size / 1e6:.1f} MB, throughput through comfylb / direct (p50 direct "
          f"{size / p50(views[peer_url]) / 1e6:.0f} MB/s): first view at `executed` {ratio(first, lb_url, peer_url):.2f}, "
          f"later views {ratio(views, lb_url, peer_url):.2f}, "
          f"every view relayed (view_cache_mb 0) {ratio(views, relay_url, peer_url):.2f}")
    print(f"websocket relay, peer timestamp to client: comfylb p50 {p50(relay['comfylb']):.1f} ms, "
          f"direct p50 {p50(relay['direct']):.1f} ms (added {p50(relay['comfylb']) - p50(relay['direct']):+.1f} ms)")


if __name__ == "__main__":
    asyncio.run(main())
