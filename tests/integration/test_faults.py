"""No job lost: real ComfyUI peers killed and stalled, the coordinator killed, a burst.

Each test prints submitted / completed / lost / duplicated (a prompt whose client saw more
than one terminal result); lost and duplicated must be 0.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from collections import Counter

import pytest

from tests import procs
from tests.client import Client, invert_prompt, sleep_prompt
from tests.conftest import peer_backend

pytestmark = pytest.mark.real
log = logging.getLogger(__name__)

TERMINAL = ("execution_success", "execution_error", "execution_interrupted")
FAST = {"health_check": {"interval": 1.0, "timeout": 1.0, "unhealthy_threshold": 2, "healthy_threshold": 1},
        "queue": {"retry_interval": 1.0, "max_retries": 3, "max_size": 1000}}


@pytest.fixture
def fault_lb(peers, workdir, request):
    with procs.running_balancer(workdir, f"faults-{request.node.name[:30]}",
                                [peer_backend(p, max_queue=1) for p in peers], **FAST) as lb:
        yield lb


def report(name: str, runs, workdir) -> dict:
    terminal = Counter()
    for run in runs:
        terminal[run.prompt_id] = sum(1 for t, _ in run.messages if t in TERMINAL)
    success = sum(1 for run in runs if "execution_success" in run.types())
    figures = {"submitted": len(runs), "completed": success,
               "lost": sum(1 for run in runs if terminal[run.prompt_id] == 0),
               "duplicated": sum(1 for run in runs if terminal[run.prompt_id] > 1)}
    line = f"{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items())
    log.warning(line)
    with open(workdir / "fault-report.txt", "a") as f:
        f.write(line + "\n")
    return figures


async def running(c: Client, n: int) -> None:
    """Until n prompts run on the peers (the client itself sees one prompt at a time)."""
    await c.wait_event("comfylb.status", lambda d: sum(q["state"] == "running" for q in d["queue"]) >= n)


async def through_fault(c: Client, n: int, prefix: str, fault) -> list:
    """Queue n one-second prompts, cause `fault` once three are running, wait for all."""
    runs = [(await c.queue(sleep_prompt(1.0, prefix)))[2] for _ in range(n)]
    await running(c, 3)
    fault()
    await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 180)
    return runs


async def ensure_up(peer: procs.Proc) -> None:
    if peer.popen.poll() is not None:
        peer.restart()
    await asyncio.to_thread(peer.wait_ready, "/system_stats", 180)


async def test_peer_killed_with_prompts_running_and_queued(fault_lb, peers, workdir):
    victim = peers[2]
    try:
        async with Client(fault_lb.url) as c:
            runs = await through_fault(c, 12, "kill", lambda: victim.signal(signal.SIGKILL))
            figures = report("peer kill -9", runs, workdir)
            assert figures["completed"] == 12 and figures["lost"] == 0 and figures["duplicated"] == 0
            _, stats = await c.get("/lb/stats")
            assert stats["totals"]["retried"] >= 1
            _, hist = await c.get(f"/history/{runs[0].prompt_id}")
            assert hist[runs[0].prompt_id]["comfylb"]["attempts"]
    finally:
        await ensure_up(victim)


async def test_peer_stalled_then_resumed(fault_lb, peers, workdir):
    victim = peers[1]
    try:
        async with Client(fault_lb.url) as c:
            runs = await through_fault(c, 9, "stall", lambda: victim.signal(signal.SIGSTOP))
            victim.signal(signal.SIGCONT)
            figures = report("peer SIGSTOP/SIGCONT", runs, workdir)
            assert figures["completed"] == 9 and figures["lost"] == 0 and figures["duplicated"] == 0
            # once it is back, nothing more arrives for prompts that were finished elsewhere
            await c.wait_event("comfylb.status",
                               lambda d: next(b for b in d["backends"] if b["name"] == victim.name)["available"],
                               timeout=60)
            late = await c.run(invert_prompt())
            assert all(sum(1 for t, _ in r.messages if t in TERMINAL) == 1 for r in runs)
            assert "execution_success" in late.types()
    finally:
        victim.signal(signal.SIGCONT)


async def test_coordinator_killed_and_restarted(fault_lb, peers, workdir):
    async with Client(fault_lb.url) as c:
        client_id = c.client_id
        ids = [(await c.queue(sleep_prompt(1.5, "coord")))[1]["prompt_id"] for _ in range(8)]
        await running(c, 2)
    fault_lb.signal(signal.SIGKILL)
    fault_lb.popen.wait(10)
    fault_lb.restart()
    await asyncio.to_thread(fault_lb.wait_ready, "/system_stats", 30)
    async with Client(fault_lb.url, client_id=client_id) as c:
        runs = [c._track(i) for i in ids]
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 180)
        figures = report("coordinator kill -9 + restart", runs, workdir)
        assert figures["completed"] == 8 and figures["lost"] == 0 and figures["duplicated"] == 0
        _, hist = await c.get("/history", params={"max_items": "20"})
        assert set(ids) <= set(hist)


async def test_burst_of_500_prompts_from_50_clients(fault_lb, workdir):
    async def one_client() -> list:
        async with Client(fault_lb.url) as c:
            posted = await asyncio.gather(*(c.queue(invert_prompt("burst")) for _ in range(10)))
            runs = [run for status, _, run in posted if status == 200]
            assert len(runs) == 10, [b for s, b, _ in posted if s != 200]
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 600)
            return runs
    results = await asyncio.gather(*(one_client() for _ in range(50)))
    runs = [r for group in results for r in group]
    figures = report("burst 500 from 50 clients", runs, workdir)
    assert figures == {"submitted": 500, "completed": 500, "lost": 0, "duplicated": 0}
