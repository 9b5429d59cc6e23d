"""Several coordinators on one PostgreSQL database, against one on the embedded SQLite.

    .venv/bin/python bench/coordinators.py [--prompts N] [--peers 100] [--clients 30]
                                           [--window 4] [--seconds 0] [--rounds 3]

Over SIMULATED peers (max_queue 1 each, in this process, as in bench/scale.py) and a real
PostgreSQL server (tests/pg.py, so fsync=off; a fresh database per configuration and
round), runs the same quick prompts (TestSleep of 0 s) from 30 concurrent clients, each
on its own websocket, queueing its share with up to 4 POSTs in flight:
  sqlite - one coordinator on the embedded SQLite (no storage.url): the baseline;
  pg×1   - one coordinator on PostgreSQL, every client on it;
  pg×3   - three coordinators on the same database, clients spread evenly over them: one
           leads and dispatches every prompt, the two standing by pass their clients'
           requests and websockets on to it (one proxy hop more for two clients in three).
Reports prompts/s (first submit to last completion), POST /prompt p50/p95 as the clients
see it, the dispatch gap p50/p95 from the peers' own history (execution_success of one
prompt to execution_start of the next on the same peer), and CPU per prompt of the
coordinators, PostgreSQL, this process (peers and clients) and anything else on the
machine meanwhile (a run where that took over 20 % is run again, up to twice, and flagged
if it still did: such figures are not comparable).

What the figures mean: the clients outrun the coordinator, so the queue backs up and every
peer waits on the coordinator between two 0 s prompts; the gap is then about peers /
throughput, the same limit seen from the peers.  With --seconds 1.5 (or more) the peers
are the bottleneck instead, and the gap is the coordinator's reaction time to a peer
freeing up (the peers and clients share this process: its own delays are in every
gap, alike in each configuration).  --window 1 (one POST at a time per client) never backs the queue up: each
POST then waits for a free peer to accept its prompt.  Everything shares one machine: the
stand-bys' CPU is taken from the leader's, which separate machines would not do.  Prints
ratios against sqlite; rounds run the configurations in rotating order, medians shown.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from comfylb_ext.sim import start_sim  # noqa: E402
from tests import pg, procs  # noqa: E402
from tests.client import Client, sleep_prompt  # noqa: E402

CONFIGS = (("sqlite", 0), ("pg×1", 1), ("pg×3", 3))  # name, coordinators on PostgreSQL (0: none)
BUSY = 20  # % of the machine other processes may take during a run before it is run again


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def cpu_of(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_cpu(server: pg.PgServer | None) -> dict[int, float]:
    """CPU seconds of the PostgreSQL server's processes (postmaster and its children), by pid."""
    if server is None:
        return {}
    try:
        master = int((server.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    out = {master: cpu_of(master)}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == master:
                out[int(d)] = cpu_of(int(d))
    return out


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def gaps(sims, ids: set[str]) -> list[float]:
    """Idle gaps (ms) between consecutive prompts of this run on each peer, from the peers'
    own history entries (ComfyUI's status messages, with their timestamps)."""
    out: list[float] = []
    for s in sims:
        spans = []
        for pid, e in s.sim.history.items():
            if pid in ids:
                msgs = dict((m[0], m[1]) for m in e["status"]["messages"])
                if "execution_success" in msgs:  # a failed prompt is counted as such, not here
                    spans.append((msgs["execution_start"]["timestamp"], msgs["execution_success"]["timestamp"]))
        spans.sort()
        out += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return out


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every core), from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


async def run_config(work: Path, sims, server: pg.PgServer | None, name: str, n_pg: int, run: int, args) -> dict:
    tag = f"{name.replace('×', 'x')}_r{run}"
    url = await asyncio.to_thread(server.database, f"bench_{tag}") if n_pg else None  # a fresh database each time
    backends = [{"name": f"s{i}", "port": s.port, "max_queue": 1} for i, s in enumerate(sims)]
    names = {b["name"] for b in backends}
    coords: list[procs.Proc] = []

    def start(i: int) -> procs.Proc:
        storage = {"dir": str(work / f"{tag}-{i}-data"), **({"url": url} if url else {})}
        proc = procs.start_balancer(work, f"{tag}-{i}", backends, queue={"max_size": args.prompts + 100},
                                    health_check={"interval": 5.0, "timeout": 3.0}, storage=storage)
        coords.append(proc)
        return proc

    try:
        leader = start(0)
        await asyncio.to_thread(leader.wait_ready, "/system_stats", 60)
        await asyncio.to_thread(procs.wait_backends, leader, names, 120)
        standbys = [start(i) for i in range(1, max(1, n_pg))]  # only once the leader leads
        for sb in standbys:
            await asyncio.to_thread(sb.wait_ready, "/system_stats", 60)
            await asyncio.to_thread(procs.wait_backends, sb, names, 120)  # answered by the leader, through sb
        if n_pg:
            assert "leads the cluster" in leader.log.read_text(), leader.tail()
        for sb in standbys:
            assert "standing by" in sb.log.read_text(), sb.tail()
        return await drive(sims, server, coords, args)
    finally:
        for proc in reversed(coords):  # stand-bys first, or one would take over from the leader gone
            proc.stop()


async def drive(sims, server: pg.PgServer | None, coords: list[procs.Proc], args) -> dict:
    shares = [args.prompts // args.clients + (i < args.prompts % args.clients) for i in range(args.clients)]
    posts: list[float] = []
    go = asyncio.Event()

    async def submit(c: Client, n: int) -> list:
        """One client: its share queued as fast as the coordinator takes it, with at most
        args.window POSTs of its own in flight."""
        window = asyncio.Semaphore(args.window)

        async def post() -> object:
            async with window:
                t = time.perf_counter()
                status, body, run = await c.queue(sleep_prompt(args.seconds, "coord"))
                posts.append((time.perf_counter() - t) * 1000)
                assert status == 200, body
                return run
        await go.wait()
        return await asyncio.gather(*(post() for _ in range(n)))

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(coords[i % len(coords)].url)) for i in range(args.clients)]
        before = ({p.name: cpu_of(p.popen.pid) for p in coords}, pg_cpu(server), own_cpu(), machine_busy())
        tasks = [asyncio.ensure_future(submit(c, n)) for c, n in zip(clients, shares)]
        t0 = time.perf_counter()
        go.set()
        try:
            runs = [r for rs in await asyncio.wait_for(asyncio.gather(*tasks), args.timeout) for r in rs]
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), args.timeout)
        finally:
            for t in tasks:
                t.cancel()
        wall = time.perf_counter() - t0
        coord = {p.name: cpu_of(p.popen.pid) - before[0][p.name] for p in coords}
        db = sum(v - before[1].get(pid, 0.0) for pid, v in pg_cpu(server).items())
        me = own_cpu() - before[2]
        busy = machine_busy() - before[3]
    n = len(runs)
    g = gaps(sims, {r.prompt_id for r in runs})
    others = max(0.0, busy - sum(coord.values()) - db - me) / (wall * (os.cpu_count() or 1)) * 100
    return {"rate": n / wall, "post50": pct(posts, .5), "post95": pct(posts, .95), "gap50": pct(g, .5),
            "gap95": pct(g, .95), "failed": sum("execution_success" not in r.types() for r in runs),
            "coord_ms": sum(coord.values()) / n * 1000, "lead_ms": coord[coords[0].name] / n * 1000,
            "pg_ms": db / n * 1000, "me_ms": me / n * 1000, "others": others}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--peers", type=int, default=100)
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--window", type=int, default=4,
                    help="POSTs each client keeps in flight (1: one at a time; then, with a peer free for every "
                         "prompt, the queue never backs up)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three configurations (medians shown)")
    ap.add_argument("--seconds", type=float, default=0.0, help="TestSleep seconds per prompt")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a configuration may take to run through")
    args = ap.parse_args()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)  # still clean up
    work = Path(tempfile.mkdtemp(prefix="comfylb-coord-"))
    sims: list = []
    server: pg.PgServer | None = None
    results: dict[str, list[dict]] = {name: [] for name, _ in CONFIGS}
    ok = False
    try:
        for i in range(args.peers):
            sims.append(await start_sim(name=f"s{i}", root=work / "peers" / f"s{i}"))
        server = await asyncio.to_thread(pg.start)
        for rnd in range(args.rounds):
            for name, n_pg in CONFIGS[rnd % 3:] + CONFIGS[:rnd % 3]:  # each round in another order: drift hits all
                for attempt in range(3):  # again when something else took the machine meanwhile
                    r = await run_config(work, sims, server, name, n_pg, rnd * 10 + attempt, args)
                    if r["others"] <= BUSY:
                        break
                    print(f"{name} round {rnd + 1}: other processes took {r['others']:.0f}% of the machine; "
                          + ("once more" if attempt < 2 else "kept"), file=sys.stderr)
                results[name].append(r)
        ok = True
    finally:
        for s in sims:
            await s.stop()
        if server is not None:
            await asyncio.to_thread(server.stop)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(logs kept in {work})", file=sys.stderr)
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    base = med["sqlite"]
    print(f"{args.prompts} TestSleep({args.seconds:g} s) prompts from {args.clients} clients "
          f"({args.window} POSTs in flight each) over {args.peers} "
          f"simulated peers (max_queue 1), {args.rounds} round(s), medians; one {os.cpu_count()}-core machine")
    print(f"{'':8}{'prompts/s':>10}{'POST p50':>10}{'POST p95':>10}{'gap p50':>9}{'gap p95':>9}"
          f"{'CPU ms/prompt: coords (leader)':>32}{'pg':>6}{'bench':>7}{'others':>8}")
    for name, r in med.items():
        failed = sum(x["failed"] for x in results[name])
        print(f"{name:8}{r['rate']:>10.0f}{r['post50']:>8.1f}ms{r['post95']:>8.1f}ms{r['gap50']:>7.0f}ms"
              f"{r['gap95']:>7.0f}ms{r['coord_ms']:>24.2f} ({r['lead_ms']:.2f}){r['pg_ms']:>6.2f}{r['me_ms']:>7.2f}"
              f"{r['others']:>7.0f}%" + (f"  {failed} FAILED" if failed else ""))
    for name, r in med.items():
        if name != "sqlite":
            print(f"{name} / sqlite: prompts/s {r['rate'] / base['rate']:.2f}×, POST p50 {r['post50'] / base['post50']:.2f}×,"
                  f" gap p50 {r['gap50'] / base['gap50']:.2f}×, gap p95 {r['gap95'] / base['gap95']:.2f}×, "
                  f"coordinator CPU per prompt {r['coord_ms'] / base['coord_ms']:.2f}×")
    busy = [f"{name} round {i + 1} ({x['others']:.0f}%)" for name, rs in results.items() for i, x in enumerate(rs)
            if x["others"] > BUSY]
    if busy:
        print(f"WARNING: other processes took more than {BUSY}% of the machine during " + ", ".join(busy))
    print("prompts/s by round: " + "; ".join(f"{name} " + " ".join(f"{x['rate']:.0f}" for x in rs)
                                             for name, rs in results.items()))
    print("(gap: a peer's execution_success -> its next execution_start, from its own history; pg×3: one leader "
          "dispatches, two stand-bys proxy 2/3 of the clients to it; CPU: every coordinator, the PostgreSQL "
          "server, this process = peers + clients; others: the machine's CPU used by anything else meanwhile)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main())
