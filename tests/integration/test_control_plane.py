"""The /lb/* management API and health checking, against real ComfyUI peers."""
from __future__ import annotations

import asyncio
import logging
import signal
import time

import pytest

from tests import procs
from tests.client import Client, invert_prompt, sleep_prompt
from tests.conftest import peer_backend
from tests.integration.test_client_api import ran_on

pytestmark = pytest.mark.real
log = logging.getLogger(__name__)

HC = {"interval": 1.0, "timeout": 1.0, "unhealthy_threshold": 2, "healthy_threshold": 1}


@pytest.fixture(scope="module")
def ops_lb(peers, workdir):
    """A balancer for operators' tests: two peers to start with, the third added later."""
    with procs.running_balancer(workdir, "ops", [peer_backend(p, max_queue=2) for p in peers[:2]],
                                health_check=HC, scheduler={"strategy": "least_busy", "prefer_idle": False}) as lb:
        yield lb


def backend_state(snapshot: dict, name: str) -> dict | None:
    return next((b for b in snapshot["backends"] if b["name"] == name), None)


async def until_backend(c: Client, name: str, pred, timeout: float = 60) -> dict:
    """The backend's state once `pred` holds: now (GET /lb/backends), or when a pushed
    comfylb.status says so."""
    _, now = await c.get("/lb/backends")
    b = backend_state(now, name)
    if b is not None and pred(b):
        return b
    snap = await c.wait_event("comfylb.status", lambda d: (lambda x: x is not None and pred(x))(
        backend_state(d, name)), timeout)
    return backend_state(snap, name)


async def test_error_cases_answer_4xx_with_a_reason(ops_lb):
    async with Client(ops_lb.url) as c:
        cases = [
            ("POST", "/lb/backends", b"{nope", 400),
            ("POST", "/lb/backends", b"[1]", 400),
            ("POST", "/lb/backends", b'{"name": "x", "host": "ftp://h", "port": 1}', 400),
            ("POST", "/lb/backends", b'{"name": "x", "host": "h", "port": 70000}', 400),
            ("POST", "/lb/backends", b'{"name": "x", "host": "h", "port": "80"}', 400),
            ("POST", "/lb/backends", b'{"host": "h"}', 400),
            ("POST", "/lb/backends", b'{"name": "peer1", "host": "127.0.0.1", "port": 1}', 409),
            ("DELETE", "/lb/backends/nobody", None, 404),
            ("POST", "/lb/backends/nobody/enable", None, 404),
            ("POST", "/lb/backends/nobody/disable", None, 404),
            ("GET", "/lb/backends/nobody", None, 404),
            ("GET", "/lb/tasks?state=sleeping", None, 400),
            ("GET", "/lb/tasks?limit=x", None, 400),
            ("GET", "/lb/tasks?limit=0", None, 400),
            ("GET", "/lb/tasks/not-a-task", None, 404),
            ("DELETE", "/lb/tasks/not-a-task", None, 404),
            ("POST", "/lb/scheduler/strategy/fastest", None, 400),
            ("POST", "/lb/scheduler/order/shortest_first", None, 400),
        ]
        for method, path, body, want in cases:
            headers = {"Content-Type": "application/json"} if body else {}
            async with c.session.request(method, c.base + path, data=body, headers=headers) as r:
                payload = await r.json()
                assert r.status == want, (method, path, r.status, payload)
                assert payload["error"], (method, path)
        # a JSON body sent as anything else (a browser's cross-site form or text/plain)
        async with c.session.post(c.base + "/lb/backends", data=b'{"name": "x", "host": "h", "port": 1}',
                                  headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415 and "Content-Type" in (await r.json())["error"]
        run = await c.run(invert_prompt())
        async with c.session.delete(f"{c.base}/lb/tasks/{run.prompt_id}") as r:
            assert r.status == 409  # already done


async def test_stats_backends_tasks_and_health_check(ops_lb, peers):
    async with Client(ops_lb.url) as c:
        run = await c.run(sleep_prompt(0.2))
        _, stats = await c.get("/lb/stats")
        assert stats["totals"]["completed"] >= 1 and stats["uptime"] > 0
        assert set(stats["backends"]) >= {"peer1", "peer2"}
        assert {"submitted", "queued", "running", "completed", "failed", "cancelled", "retried"} <= set(stats["totals"])
        _, body = await c.get("/lb/backends")
        b = backend_state(body, "peer1")
        assert b["status"] == "healthy" and b["url"] == peers[0].url and b["max_queue"] == 2
        assert b["devices"] and b["devices"][0]["type"] == "cpu"
        assert {"in_flight", "jobs_done", "mean_job_time", "weight", "enabled"} <= set(b)
        assert b["health"]["changed_at"] and "last_error" in b["health"]
        _, tasks = await c.get("/lb/tasks", params={"state": "done", "limit": "5"})
        assert tasks["tasks"][0]["task_id"] == run.prompt_id and tasks["tasks"][0]["peer"] in ("peer1", "peer2")
        assert tasks["tasks"][0]["attempts"] == 1 and tasks["tasks"][0]["finished_at"]
        _, detail = await c.get(f"/lb/tasks/{run.prompt_id}")
        assert detail["state"] == "done" and detail["prompt"]["2"]["class_type"] == "TestSleep"
        status, checked = await c.post("/lb/health-check")
        states = {b["name"]: b["state"] for b in checked["backends"]}
        assert status == 200 and states["peer1"] == states["peer2"] == "healthy"


async def test_cancel_a_queued_and_a_running_task(ops_lb):
    async with Client(ops_lb.url) as c:
        await c.post("/lb/backends/peer2/disable")
        try:
            first = (await c.queue(sleep_prompt(5)))[2]
            second = (await c.queue(sleep_prompt(5)))[2]
            third = (await c.queue(sleep_prompt(5)))[2]   # peer1 holds two; this one waits
            await c.until(lambda: "execution_start" in first.types(), 30)
            async with c.session.delete(f"{c.base}/lb/tasks/{third.prompt_id}") as r:
                assert r.status == 202
            async with c.session.delete(f"{c.base}/lb/tasks/{second.prompt_id}") as r:
                assert r.status == 202
            async with c.session.delete(f"{c.base}/lb/tasks/{first.prompt_id}") as r:
                assert r.status == 202
            await asyncio.wait_for(asyncio.gather(first.done.wait(), second.done.wait(), third.done.wait()), 30)
            for run in (first, second, third):
                assert "execution_interrupted" in run.types() and "execution_success" not in run.types()
            _, tasks = await c.get("/lb/tasks", params={"state": "cancelled"})
            assert {first.prompt_id, second.prompt_id, third.prompt_id} <= {t["task_id"] for t in tasks["tasks"]}
        finally:
            await c.post("/lb/backends/peer2/enable")


async def test_disabled_peer_gets_no_work_and_strategy_switch_changes_placement(ops_lb, peers):
    async with Client(ops_lb.url) as c:
        status, b = await c.post("/lb/backends/peer1/disable")
        assert status == 200 and b["enabled"] is False and b["status"] == "disabled"
        snap = await c.wait_event("comfylb.status", lambda d: backend_state(d, "peer1")["enabled"] is False)
        assert backend_state(snap, "peer1")["status"] == "disabled"
        runs = await asyncio.gather(*(c.run(sleep_prompt(0.2)) for _ in range(4)))
        for run in runs:
            assert await ran_on(peers, run.prompt_id) == ["peer2"]
        await c.post("/lb/backends/peer1/enable")

        async def placement(strategy: str) -> list[str]:
            status, info = await c.post(f"/lb/scheduler/strategy/{strategy}")
            assert status == 200 and info["strategy"] == strategy
            long = (await c.queue(sleep_prompt(3)))[2]
            await c.until(lambda: "execution_start" in long.types(), 30)
            hosts = []
            for _ in range(2):
                run = await c.run(invert_prompt())
                _, hist = await c.get(f"/history/{run.prompt_id}")
                # where the strategy sent it first (an idle peer may take it back later)
                hosts.append(hist[run.prompt_id]["comfylb"]["attempts"][0]["peer"])
            await asyncio.wait_for(long.done.wait(), 30)
            (busy,) = await ran_on(peers, long.prompt_id)
            return ["busy" if h == busy else "idle" for h in hosts]

        assert await placement("least_busy") == ["idle", "idle"]
        assert sorted(await placement("round_robin")) == ["busy", "idle"]
        _, info = await c.get("/lb/scheduler")
        assert info["strategies"] == ["least_busy", "round_robin", "weighted"]
        await c.post("/lb/scheduler/strategy/least_busy")


async def test_add_and_remove_a_peer_at_runtime_with_no_prompt_lost(ops_lb, peers):
    third = peers[2]
    async with Client(ops_lb.url) as c:
        runs = [(await c.queue(sleep_prompt(0.5)))[2] for _ in range(10)]
        status, body = await c.post("/lb/backends", {"name": third.name, "host": "127.0.0.1", "port": third.port,
                                                     "max_queue": 2})
        assert status == 201 and body["name"] == third.name
        await c.wait_event("comfylb.status", lambda d: (backend_state(d, third.name) or {}).get("available"))
        more = [(await c.queue(sleep_prompt(0.5)))[2] for _ in range(6)]
        async with c.session.delete(f"{c.base}/lb/backends/{peers[0].name}") as r:
            assert r.status == 200
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs + more)), 120)
        placed = {}
        for run in runs + more:
            hosts = await ran_on(peers, run.prompt_id)
            assert len(hosts) == 1 and "execution_success" in run.types()
            placed.setdefault(hosts[0], 0)
            placed[hosts[0]] += 1
        assert placed.get(third.name, 0) > 0
        _, body = await c.get("/lb/backends")
        assert peers[0].name not in {b["name"] for b in body["backends"]}
        # put it back for the tests that follow
        status, _ = await c.post("/lb/backends", {"name": peers[0].name, "host": "127.0.0.1", "port": peers[0].port,
                                                  "max_queue": 2})
        assert status == 201
        await c.wait_event("comfylb.status", lambda d: (backend_state(d, peers[0].name) or {}).get("available"))


async def test_stalled_peer_turns_unhealthy_then_recovers(ops_lb, peers):
    """SIGSTOP: the socket stays open, so only the active checks can tell."""
    victim = peers[2]
    async with Client(ops_lb.url) as c:
        _, body = await c.get("/lb/backends")
        if victim.name not in {b["name"] for b in body["backends"]}:
            await c.post("/lb/backends", {"name": victim.name, "host": "127.0.0.1", "port": victim.port})
        await until_backend(c, victim.name, lambda b: b["status"] == "healthy")
        victim.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            snap = await c.wait_event("comfylb.status",
                                      lambda d: backend_state(d, victim.name)["health"]["state"] == "unhealthy")
            took = time.monotonic() - t0
            log.info("stalled peer detected after %.2f s (bound interval*threshold+timeout = %.1f s)",
                     took, HC["interval"] * HC["unhealthy_threshold"] + HC["timeout"])
            b = backend_state(snap, victim.name)
            assert b["available"] is False and b["health"]["last_error"]
            run = await c.run(invert_prompt())
            assert victim.name not in await ran_on([p for p in peers if p is not victim], run.prompt_id)
        finally:
            victim.signal(signal.SIGCONT)
        await c.wait_event("comfylb.status", lambda d: backend_state(d, victim.name)["available"])


async def test_killed_peer_leaves_rotation_at_once_and_returns_by_itself(ops_lb, peers):
    victim = peers[2]
    async with Client(ops_lb.url) as c:
        await until_backend(c, victim.name, lambda b: b["available"])
        victim.signal(signal.SIGKILL)
        snap = await c.wait_event("comfylb.status", lambda d: backend_state(d, victim.name)["linked"] is False)
        assert backend_state(snap, victim.name)["available"] is False
        runs = await asyncio.gather(*(c.run(invert_prompt()) for _ in range(3)))
        assert all("execution_success" in r.types() for r in runs)
        victim.restart()
        await asyncio.to_thread(victim.wait_ready, "/system_stats", 180)
        snap = await c.wait_event("comfylb.status", lambda d: backend_state(d, victim.name)["available"], timeout=60)
        assert backend_state(snap, victim.name)["status"] == "healthy"
