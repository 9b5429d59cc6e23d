"""Local workers with real ComfyUI on CPU (issue 15, item 1): the standalone balancer starts
them as peers worker-0…, brings a killed one back, restarts one on request, shows its log,
and leaves no worker process behind when it stops or is killed with SIGKILL."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request

import aiohttp
import pytest

from tests import procs
from tests.client import Client, sleep_prompt

pytestmark = pytest.mark.real
STARTUP = 180  # seconds a CPU ComfyUI may take to come up on a loaded machine


def workers_section(comfy_env: dict, count: int) -> dict:
    # as tests/procs.start_comfyui runs ComfyUI: on CPU, with ComfyUI's testing nodes (TestSleep)
    return {"count": count, "base_port": procs.free_ports(count), "comfyui": comfy_env["tree"],
            "python": comfy_env["python"],
            "args": ["--cpu", "--extra-model-paths-config", "tests/execution/extra_model_paths.yaml"]}


def get(lb: procs.Proc, path: str) -> dict:
    with urllib.request.urlopen(lb.url + path, timeout=10) as r:
        return json.load(r)


def post(lb: procs.Proc, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(lb.url + path, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.load(r)


def worker(lb: procs.Proc, name: str) -> dict:
    b = get(lb, f"/lb/backends/{name}")
    return {**b["worker"], "available": b["available"]}


def replaced(lb: procs.Proc, name: str, before: dict) -> bool:
    """The worker was started once more since `before`, as another process, and is available."""
    now = worker(lb, name)
    return now["restarts"] == before["restarts"] + 1 and now["available"] and now["pid"] != before["pid"]


def worker_pids(lb: procs.Proc) -> list[int]:
    return [b["worker"]["pid"] for b in get(lb, "/lb/backends")["backends"] if b.get("worker")]


@pytest.fixture(scope="module")
def lb(comfy_env, workdir):
    proc = procs.start_balancer(workdir, "workers", [], workers=workers_section(comfy_env, 2),
                                queue={"retry_interval": 1.0, "max_retries": 3, "max_size": 100})
    try:
        proc.wait_ready("/lb/state", 30)
        procs.wait_backends(proc, {"worker-0", "worker-1"}, timeout=STARTUP)
        yield proc
    finally:
        proc.stop()


async def run_prompts(lb: procs.Proc, n: int) -> None:
    async with Client(lb.url) as c:
        runs = [(await c.queue(sleep_prompt(0.5, "workers")))[2] for _ in range(n)]
        for run in runs:
            await asyncio.wait_for(run.done.wait(), 120)
            assert "execution_success" in run.types(), run.types()


async def test_two_workers_are_peers_and_run_prompts(lb):
    before = {b["name"]: b["jobs_done"] for b in get(lb, "/lb/backends")["backends"]}
    await run_prompts(lb, 4)
    after = {b["name"]: b["jobs_done"] for b in get(lb, "/lb/backends")["backends"]}
    assert set(after) == {"worker-0", "worker-1"}
    assert all(after[n] > before[n] for n in after), (before, after)  # max_queue 1: both took some
    w0 = worker(lb, "worker-0")
    assert w0["state"] == "running" and w0["gpu"] is None and procs.alive(w0["pid"])


async def test_a_killed_worker_comes_back_and_runs_prompts(lb):
    w0 = worker(lb, "worker-0")
    os.kill(w0["pid"], signal.SIGKILL)
    procs.until(lambda: replaced(lb, "worker-0", w0), "worker-0 back after kill -9", lb, STARTUP)
    post(lb, "/lb/backends/worker-1/disable")  # only worker-0 can take them now
    try:
        await run_prompts(lb, 2)
    finally:
        post(lb, "/lb/backends/worker-1/enable")


def test_the_log_route_shows_the_workers_output(lb):
    body = get(lb, "/lb/backends/worker-1/log?lines=400")
    text = "\n".join(body["lines"])
    assert body["name"] == "worker-1" and "ComfyLB: starting worker-1" in text
    assert "To see the GUI go to" in text or "Starting server" in text, text[-2000:]
    assert len(get(lb, "/lb/backends/worker-1/log?lines=3")["lines"]) == 3


async def test_restart_on_request(lb):
    w1 = worker(lb, "worker-1")
    status, body = post(lb, "/lb/backends/worker-1/restart")
    assert status == 202 and body["name"] == "worker-1"
    procs.until(lambda: replaced(lb, "worker-1", w1), "worker-1 back after a restart", lb, STARTUP)
    assert not procs.alive(w1["pid"])


async def test_bad_worker_requests_are_4xx(lb):
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/lb/backends/nope/log"), ("POST", "/lb/backends/nope/restart"),
                             ("GET", "/lb/backends/worker-0/log?lines=0"), ("DELETE", "/lb/backends/worker-0")):
            async with s.request(method, lb.url + path) as r:
                assert 400 <= r.status < 500 and "error" in await r.json(), (method, path, r.status)


def test_stopping_the_balancer_stops_its_workers(comfy_env, workdir):
    lb = procs.start_balancer(workdir, "workers-stop", [], workers=workers_section(comfy_env, 1))
    try:
        lb.wait_ready("/lb/state", 30)
        pids = procs.until(lambda: [p for p in worker_pids(lb) if p], "a worker pid", lb, STARTUP)
    finally:
        lb.stop()
    assert lb.popen.returncode == 0
    assert not [p for p in pids if procs.alive(p)]  # stopped before the balancer exited


def test_kill_9_of_the_balancer_leaves_no_worker(comfy_env, workdir):
    lb = procs.start_balancer(workdir, "workers-kill", [], workers=workers_section(comfy_env, 1))
    try:
        lb.wait_ready("/lb/state", 30)
        pids = procs.until(lambda: [p for p in worker_pids(lb) if p], "a worker pid", lb, STARTUP)
        os.kill(lb.popen.pid, signal.SIGKILL)
        lb.popen.wait(10)
        procs.until(lambda: not [p for p in pids if procs.alive(p)], "workers gone after kill -9 of the balancer", lb,
                    30)
    finally:
        lb.stop()


def test_inside_comfyui_workers_run_on_the_coordinators_own_install(comfy_env, workdir):
    """A coordinator ComfyUI with `workers:` and no other peer: its worker is its own
    ComfyUI and Python, runs prompts, and the ComfyLB in the worker stays out of the way
    (it does not attach, so it starts no workers of its own)."""
    from tests.conftest import coordinator

    section = {"count": 1, "base_port": procs.free_ports(1), "args": ["--cpu"]}
    coord = coordinator(comfy_env, workdir, "coord_workers",
                        {"health_check": {"interval": 1.0, "timeout": 2.0}, "workers": section})
    try:
        coord.wait_ready("/system_stats", STARTUP)
        procs.wait_backends(coord, {"worker-0"}, timeout=STARTUP)
        worker = get(coord, "/lb/backends/worker-0")
        assert worker["worker"]["state"] == "running"
        prompt = sleep_prompt(0.1, "inside-workers")

        async def run() -> list[str]:
            async with Client(coord.url) as c:
                return (await c.run(prompt, timeout=STARTUP)).types()
        assert "execution_success" in asyncio.run(run())
        log = get(coord, "/lb/backends/worker-0/log?lines=400")
        text = "\n".join(log["lines"])
        assert "a local worker of a coordinator: not attaching" in text
        assert "worker-1" not in json.dumps(get(coord, "/lb/backends"))  # no worker started a worker
    finally:
        coord.stop()
