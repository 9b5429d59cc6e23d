"""Peak memory and event-loop stalls of the standalone balancer under issue 12's attacks.

    .venv/bin/python bench/hostile.py [--repo PATH] [--scenario big|hostile|all]

The balancer runs as its own process, as a user starts it (`python -m comfylb_ext -c …`,
from `--repo`, default this checkout: point it at an older checkout to compare); its
resident memory (VmRSS) and peak (VmHWM) are read from /proc.  A client polls GET /prompt
every 10 ms throughout and reports the longest answer it waited for in each phase: how
long the event loop was blocked for every other client.

- big: 3 prompts of 95 MB (the issue's attack), then 3 of 30 MB as one string (an image
  sent as base64), then 3 of 30 MB made of 950,000 short strings (the most structure under
  the limit); each batch queued, read back with GET /queue, run, and read back with GET
  /history.  Two simulated peers (processes of their own) run them.
- hostile: one simulated peer and one hostile peer (served by this script) that sends a
  websocket frame announcing 1 GiB with 350 MB of it, then stalls and answers no ping,
  and answers /object_info with 200 MB.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

HERE = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def spawn(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _ping(url: str, conn) -> None:
    """In a process of its own (the bench's own work must not delay it): GET /prompt every
    10 ms; answers "phase" with the longest wait since the last one."""
    import urllib.request
    worst, count, failed = 0.0, 0, 0
    while True:
        if conn.poll():
            if conn.recv() == "stop":
                conn.send((worst, count, failed))
                return
            conn.send(worst)
            worst = 0.0
        t0 = time.perf_counter()
        try:
            urllib.request.urlopen(url + "/prompt", timeout=120).read()
        except OSError:
            failed += 1
        worst = max(worst, time.perf_counter() - t0)
        count += 1
        time.sleep(0.01)


class Pinger:
    """Another client: how long it waited for the balancer in each phase."""

    def __init__(self, url: str) -> None:
        import multiprocessing
        self.conn, theirs = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("spawn").Process(target=_ping, args=(url, theirs), daemon=True)
        self.proc.start()
        self.count = self.failed = 0

    def phase(self) -> float:
        self.conn.send("phase")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        _, self.count, self.failed = self.conn.recv()
        self.proc.join(10)


class Report:
    def __init__(self, pid: int, pinger: Pinger) -> None:
        self.pid, self.pinger, self.requests, self.errors = pid, pinger, 0, 0
        rss, _ = mem_mb(pid)
        print(f"  start: RSS {rss:.0f} MB")

    def count(self, statuses: list[int]) -> None:
        self.requests += len(statuses)
        self.errors += sum(s >= 500 for s in statuses)

    def phase(self, name: str, statuses: list[int], seconds: float) -> None:
        self.count(statuses)
        rss, hwm = mem_mb(self.pid)
        print(f"  {name:<44} HTTP {','.join(map(str, statuses)):<24} {seconds:6.2f} s   other clients waited "
              f"≤ {self.pinger.phase() * 1000:6.0f} ms   RSS {rss:5.0f} MB, peak {hwm:5.0f} MB")


def prompt_body(filler: object, seconds: float = 0.5) -> bytes:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                           "color": uuid.uuid4().int & 0xFFFFFF, "note": filler}},
              "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "big"}}}
    return json.dumps({"prompt": prompt, "client_id": "bench"}).encode()


async def request(s: aiohttp.ClientSession, method: str, url: str, **kw) -> int:
    try:
        async with s.request(method, url, **kw) as r:
            await r.read()
            return r.status
    except aiohttp.ClientError:
        return 599


async def big(url: str, report: Report) -> None:
    batches = [("3 prompts of 95 MB", lambda: prompt_body("x" * (95 << 20))),
               ("3 prompts of 30 MB, one string", lambda: prompt_body("x" * (30 << 20))),
               ("3 prompts of 30 MB, 950,000 strings", lambda: prompt_body(["y" * 30] * 950_000))]
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for name, make in batches:
            bodies = [make() for _ in range(3)]
            t0 = time.perf_counter()
            statuses = [await request(s, "POST", url + "/prompt", data=b,
                                      headers={"Content-Type": "application/json"}) for b in bodies]
            del bodies
            report.phase(f"POST {name}", statuses, time.perf_counter() - t0)
            t0 = time.perf_counter()
            statuses = [await request(s, "GET", url + "/queue") for _ in range(3)]
            report.phase("  GET /queue ×3", statuses, time.perf_counter() - t0)
            while True:  # until they ran
                async with s.get(url + "/prompt") as r:
                    if (await r.json())["exec_info"]["queue_remaining"] == 0:
                        break
                await asyncio.sleep(0.2)
            report.pinger.phase()
            t0 = time.perf_counter()
            statuses = [await request(s, "GET", url + "/history") for _ in range(3)]
            statuses += [await request(s, "GET", url + "/api/jobs?limit=10")]
            report.phase("  GET /history ×3, /api/jobs", statuses, time.perf_counter() - t0)


def hostile_app() -> web.Application:
    async def ws(request):
        sock = web.WebSocketResponse(autoping=False)
        await sock.prepare(request)
        request.transport.write(b"\x82\x7f" + (1 << 30).to_bytes(8, "big"))  # a 1 GiB binary frame …
        chunk = b"\0" * (1 << 20)
        transport = request.transport
        for _ in range(350):  # … of which 350 MB come, then nothing: it stalls
            if transport is None or transport.is_closing():
                break
            transport.write(chunk)
            while transport.get_write_buffer_size() > 8 << 20 and not transport.is_closing():
                await asyncio.sleep(0.01)  # as fast as the balancer reads it
        if transport is not None and not transport.is_closing():
            transport.pause_reading()  # and never reads (nor answers a ping) again
        await asyncio.Event().wait()

    async def object_info(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b"{")
        entry = json.dumps({"input": {"required": {"x": [["a" * 40] * 50, {}]}}, "output": []}).encode()
        sent, i = 0, 0
        try:
            while sent < 200 << 20:
                piece = b'"Node%d": %s, ' % (i, entry)
                await resp.write(piece)
                sent, i = sent + len(piece), i + 1
            await resp.write(b'"End": {}}')
        except ConnectionError:
            pass
        return resp

    async def stats(request):
        return web.json_response({"system": {"os": "hostile"}, "devices": []})

    async def anything(request):
        return web.json_response({})

    app = web.Application()
    app.add_routes([web.get("/ws", ws), web.get("/object_info", object_info), web.get("/system_stats", stats),
                    web.route("*", "/{tail:.*}", anything)])
    return app


def serve_in_thread(app: web.Application, port: int) -> None:
    def run():
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        loop.run_forever()
    threading.Thread(target=run, daemon=True).start()


async def hostile(url: str, report: Report, port: int) -> None:
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        status = await request(s, "POST", url + "/lb/backends", json={"name": "hostile", "host": "127.0.0.1",
                                                                       "port": port})
        report.count([status])
        state = {}
        while time.perf_counter() - t0 < 60:  # its link came up, took the frame, and was lost
            async with s.get(url + "/lb/backends") as r:
                state = next(b for b in (await r.json())["backends"] if b["name"] == "hostile")
            if "1009" in str(state["health"]["last_error"]) or time.perf_counter() - t0 > 45:
                break
            await asyncio.sleep(0.5)
        report.phase("hostile peer linked, 1 GiB frame, 200 MB /object_info", [], time.perf_counter() - t0)
        print(f"    hostile peer: status {state.get('status')}, linked {state.get('linked')}, "
              f"error {str(state['health']['last_error'])[:100]}")
        t0 = time.perf_counter()
        statuses = [await request(s, "POST", url + "/prompt", data=prompt_body("n", 0.1),
                                  headers={"Content-Type": "application/json"}) for _ in range(5)]
        statuses += [await request(s, "GET", url + p) for p in ("/object_info", "/queue", "/history",
                                                                  "/system_stats", "/lb/status")]
        report.phase("prompts and reads meanwhile", statuses, time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(HERE), help="checkout whose balancer to run")
    ap.add_argument("--scenario", default="all", choices=["big", "hostile", "all"])
    ap.add_argument("--memory-db", action="store_true",
                    help="keep the state database in memory (storage.database: \":memory:\"), to tell its "
                         "writes apart from the rest")
    args = ap.parse_args()
    repo = Path(args.repo).resolve()
    work = Path(tempfile.mkdtemp(prefix="comfylb-hostile-"))
    scenarios = ["big", "hostile"] if args.scenario == "all" else [args.scenario]
    print(f"balancer from {repo}" + (", state database in memory" if args.memory_db else ""))
    totals = [0, 0]
    for scenario in scenarios:
        procs: list[subprocess.Popen] = []
        try:
            sims = [free_port() for _ in range(2 if scenario == "big" else 1)]
            for i, port in enumerate(sims):
                procs.append(spawn([PY, "-m", "comfylb_ext.sim", "--port", str(port), "--name", f"sim{i}"], HERE,
                                   work / f"sim{i}.log"))
            backends = [{"name": f"sim{i}", "host": "127.0.0.1", "port": p, "max_queue": 1} for i, p in enumerate(sims)]
            if scenario == "hostile":  # added once the balancer runs (POST /lb/backends)
                hostile_port = free_port()
                serve_in_thread(hostile_app(), hostile_port)
            lb_port = free_port()
            storage = {"dir": str(work / f"{scenario}-data"), **({"database": ":memory:"} if args.memory_db else {})}
            cfg = {"server": {"host": "127.0.0.1", "port": lb_port}, "storage": storage,
                   "health_check": {"interval": 1.0, "timeout": 2.0}, "backends": backends}
            (work / f"{scenario}.yaml").write_text(yaml.safe_dump(cfg))
            lb = spawn([PY, "-m", "comfylb_ext", "-c", str(work / f"{scenario}.yaml")], repo, work / f"{scenario}.log")
            procs.append(lb)
            url = f"http://127.0.0.1:{lb_port}"
            async with aiohttp.ClientSession() as s:
                for _ in range(300):
                    try:
                        async with s.get(url + "/prompt") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                await asyncio.sleep(2)  # the simulated peers link
            print(f"\n{scenario}:")
            pinger = Pinger(url)
            report = Report(lb.pid, pinger)
            await (big(url, report) if scenario == "big" else hostile(url, report, hostile_port))
            pinger.close()
            totals[0] += report.requests + pinger.count
            totals[1] += report.errors + pinger.failed
            print(f"  requests {report.requests} (+{pinger.count} polls), 5xx or failed {report.errors} "
                  f"(+{pinger.failed} polls)")
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 15)
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, 9)
    print(f"\nin all: {totals[0]} requests, {totals[1]} answered 5xx or not at all")


if __name__ == "__main__":
    asyncio.run(main())
