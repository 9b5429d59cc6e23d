"""Model copies: how fast a copy between two peers' agents goes through the coordinator,
against copying the same file on the same disk.

    .venv/bin/python bench/copies.py [--mb 512] [--runs 3]

Two agents (comfylb_ext.agent, as a peer with `role: peer` runs it) serve their own model
folders from this process over real sockets; the coordinator's transfers.Transfers streams
a `--mb` MB file of random bytes from one into the other (read with a Range-capable GET,
written by a signed PUT, hashed on both sides, renamed into place).  The baseline, side by
side on the same machine, is `shutil.copyfile` plus one sha256 of the result — what a copy
by hand and a check of it would cost.  Prints MB/s of each and their ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfylb_ext.agent import Agent  # noqa: E402
from comfylb_ext.config import BackendConfig  # noqa: E402
from comfylb_ext.peer import Peer  # noqa: E402
from comfylb_ext.transfers import Agents, Transfers  # noqa: E402

SECRET = "bench-agent-secret-0123456789"


class Quiet:  # the peers' links are not started: nothing to listen to
    async def on_link_up(self, peer): ...
    async def on_link_down(self, peer, reason): ...
    async def on_message(self, peer, msg): ...
    async def on_binary(self, peer, data): ...


async def serve_agent(root: Path) -> tuple[web.AppRunner, int]:
    folder = root / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    app = web.Application()
    Agent(SECRET, folders=lambda: {"checkpoints": ([str(folder)], {".safetensors"})}).add_to(app.router)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def baseline(src: Path, dst: Path) -> float:
    started = time.perf_counter()
    shutil.copyfile(src, dst)
    h = hashlib.sha256()
    with open(dst, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    took = time.perf_counter() - started
    dst.unlink()
    return took


async def through_coordinator(work: Path, size: int, run: int) -> float:
    runners = []
    try:
        a_runner, a_port = await serve_agent(work / "a")
        b_runner, b_port = await serve_agent(work / "b")
        runners += [a_runner, b_runner]
        async with aiohttp.ClientSession(auto_decompress=False, read_bufsize=1 << 20) as session:
            peers = {n: Peer(BackendConfig(name=n, port=p), session, "bench", Quiet(), 30)
                     for n, p in (("a", a_port), ("b", b_port))}
            for p in peers.values():
                p.agent = True
            changed = asyncio.Event()

            async def copied(peer: Peer) -> None:
                return None
            transfers = Transfers(Agents(SECRET), peers.get, lambda: session, asyncio.ensure_future,
                                  changed.set, copied)
            started = time.perf_counter()
            t, _ = await transfers.start(peers["b"], "checkpoints", "model.safetensors", "a")
            while t.active:
                changed.clear()
                await changed.wait()
            took = time.perf_counter() - started
            assert t.state == "done" and t.done == size, t.describe()
            (work / "b" / "checkpoints" / "model.safetensors").unlink()
            return took
    finally:
        for r in runners:
            await r.cleanup()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = args.mb << 20
    with tempfile.TemporaryDirectory(prefix="comfylb-bench-copies-") as tmp:
        work = Path(tmp)
        src = work / "a" / "checkpoints" / "model.safetensors"
        src.parent.mkdir(parents=True)
        with open(src, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        print(f"copying a {args.mb} MB model file, {args.runs} runs each, side by side")
        print(f"{'run':>4} {'by hand + sha256':>18} {'through ComfyLB':>17} {'ratio':>7}")
        for run in range(args.runs):
            hand = baseline(src, work / "hand.safetensors")
            lb = await through_coordinator(work, size, run)
            print(f"{run + 1:>4} {args.mb / hand:>13.0f} MB/s {args.mb / lb:>12.0f} MB/s {lb / hand:>6.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
