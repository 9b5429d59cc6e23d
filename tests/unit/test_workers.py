"""Local workers (issue 15, item 1): the pure parts with plain data, and the supervisor over a
stand-in ComfyUI (its main.py runs a simulated peer), so restarts, logs and the two routes
are tested in seconds; tests/integration/test_workers.py does the same with real ComfyUI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from comfylb_ext import workers as w
from comfylb_ext.config import ConfigError, WorkersConfig, parse, parse_workers
from tests import procs
from tests.fakeworkers import FAKE_MAIN, lb_over_fake_workers
from tests.simcluster import lb_over_sims, wait_for

REPO = procs.REPO
__all__ = ["FAKE_MAIN", "REPO"]  # tests/integration/test_cluster_page.py imports them from here, for now
SMI = "GPU 0: NVIDIA RTX 4090 (UUID: GPU-aaa)\nGPU 1: NVIDIA RTX 4090 (UUID: GPU-bbb)\n"


# -- config ----------------------------------------------------------------------------------
def test_the_section_reads_numbers_auto_and_gpu_ids():
    assert not parse({}).workers.enabled
    cfg = parse({"workers": {"count": "auto", "gpus": [0, "1"], "args": ["--cpu"], "base_port": 9000}}).workers
    assert (cfg.count, cfg.gpus, cfg.args, cfg.base_port, cfg.enabled) == ("auto", ["0", "1"], ["--cpu"], 9000, True)
    assert parse({"workers": {"count": 2}}).workers.count == 2


@pytest.mark.parametrize("raw, field", [
    ({"count": -1}, "workers.count"), ({"count": "many"}, "workers.count"), ({"count": True}, "workers.count"),
    ({"gpus": "0,1"}, "workers.gpus"), ({"gpus": [None]}, "workers.gpus"), ({"base_port": 0}, "workers.base_port"),
    ({"count": 3, "base_port": 65534}, "workers.base_port"), ({"args": ["--port", "1"]}, "workers.args"),
    ({"args": ["--output-directory=/x"]}, "workers.args"), ({"colour": 1}, "workers.colour"),
    ({"max_queue": 0}, "workers"), ({"args": "--cpu"}, "workers.args"),
])
def test_bad_settings_name_the_field(raw, field):
    with pytest.raises(ConfigError) as e:
        parse_workers(raw)
    assert e.value.field == field


def test_a_backend_may_not_take_a_workers_name():
    with pytest.raises(ConfigError) as e:
        parse({"workers": {"count": 1}, "backends": [{"name": "worker-0"}]})
    assert e.value.field == "backends[0].name"
    assert parse({"backends": [{"name": "worker-0"}]}).backends[0].name == "worker-0"  # no workers: any name


def test_the_standalone_balancer_needs_a_comfyui_and_a_python(tmp_path):
    with pytest.raises(ConfigError, match="workers.comfyui"):
        w.check_install("", sys.executable)
    with pytest.raises(ConfigError, match="no main.py"):
        w.check_install(str(tmp_path), sys.executable)
    (tmp_path / "main.py").write_text("")
    with pytest.raises(ConfigError, match="workers.python"):
        w.check_install(str(tmp_path), str(tmp_path / "nope"))
    w.check_install(str(tmp_path), sys.executable)


# -- how many, which GPU, what command -----------------------------------------------------------
def test_gpus_come_from_cuda_visible_devices_else_nvidia_smi():
    assert w.parse_nvidia_smi(SMI) == ["0", "1"]
    assert w.visible_gpus({}, SMI) == ["0", "1"]
    assert w.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}, SMI) == ["2", "3"]
    assert w.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, SMI) == []
    assert w.visible_gpus({}, None) == []


def test_auto_is_one_per_free_gpu_one_on_cpu_none_without_either():
    auto = WorkersConfig(count="auto")
    assert w.worker_count(auto, ["0", "1", "2"])[0] == 3
    assert w.worker_count(auto, ["0", "1", "2"], taken="0")[0] == 2
    assert w.worker_count(WorkersConfig(count="auto", gpus=["5"]), ["0", "1"])[0] == 1
    assert w.worker_count(WorkersConfig(count="auto", args=["--cpu"]), ["0", "1"])[0] == 1
    count, why = w.worker_count(auto, [])
    assert count == 0 and "--cpu" in why
    assert w.worker_count(WorkersConfig(count=4), [])[0] == 4


def test_each_worker_gets_one_gpu_round_robin():
    assert w.assign_gpus(3, WorkersConfig(count=3), ["0", "1"]) == ["0", "1", "0"]
    assert w.assign_gpus(2, WorkersConfig(count=2), ["0", "1", "2"], taken="0") == ["1", "2"]
    assert w.assign_gpus(2, WorkersConfig(count=2, args=["--cpu"]), ["0", "1"]) == [None, None]
    assert w.assign_gpus(2, WorkersConfig(count=2), []) == [None, None]


def test_plan_gives_each_worker_its_port_folders_gpu_and_name(tmp_path):
    cfg = WorkersConfig(count=2, base_port=9100, args=["--cpu", "--preview-method", "none"])
    install = w.Install("/opt/ComfyUI", "/opt/venv/bin/python", ["--base-directory", "/data"])
    plans = w.plan(cfg, install, str(tmp_path), [], {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"})
    assert [(p.name, p.port, p.gpu) for p in plans] == [("worker-0", 9100, None), ("worker-1", 9101, None)]
    argv, home = plans[1].argv, tmp_path.resolve() / "workers" / "worker-1"
    assert argv[:6] == ["/opt/venv/bin/python", "/opt/ComfyUI/main.py", "--listen", "127.0.0.1", "--port", "9101"]
    for flag, folder in (("--input-directory", "input"), ("--output-directory", "output"),
                         ("--temp-directory", "temp"), ("--user-directory", "user")):
        assert argv[argv.index(flag) + 1] == str(home / folder)
    assert argv[argv.index("--database-url") + 1] == f"sqlite:///{home / 'user' / 'comfyui.db'}"
    assert argv[-3:] == ["--cpu", "--preview-method", "none"] and "--base-directory" in argv
    assert plans[1].env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0", w.WORKER_ENV: "worker-1",
                            "PYTHONUNBUFFERED": "1"}
    assert plans[0].cwd == "/opt/ComfyUI"
    on_gpu = w.plan(WorkersConfig(count=1), install, str(tmp_path), ["3"], {"CUDA_VISIBLE_DEVICES": "3,4"})
    assert on_gpu[0].env["CUDA_VISIBLE_DEVICES"] == "3"
    old = w.Install("/c", "/p", database_url=False)  # a ComfyUI without --database-url would refuse it
    assert "--database-url" not in w.worker_argv(old, 1, tmp_path, [])
    assert w.worker_argv(install, 1, tmp_path, ["--database-url", "x"]).count("--database-url") == 1


def test_backoff_doubles_up_to_a_minute():
    assert [w.backoff(n) for n in range(0, 9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]


def test_tail_keeps_the_last_lines_of_any_bytes():
    assert w.tail(b"a\nb\nc\n", 2) == ["b", "c"]
    assert w.tail(b"\xff\xfeok\n", 5) == ["\ufffd\ufffdok"]
    assert w.tail(b"a\n", 0) == []


def test_the_wrapper_is_linux_only():
    assert w.wrapped(["/py", "main.py"], 42, "darwin") == ["/py", "main.py"]
    assert w.wrapped(["/py", "main.py"], 42, "linux") == ["/py", "-c", w.PDEATHSIG, "42", "/py", "main.py"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_wrapped_child_exits_when_its_parent_is_killed(tmp_path):
    """The parent starts the wrapped child, prints its pid and sleeps; kill -9 of the parent
    must end the child (no orphan)."""
    parent_code = ("import os, subprocess, sys, time\n"
                   "from comfylb_ext.workers import wrapped\n"
                   "c = subprocess.Popen(wrapped([sys.executable, '-c', 'import time; time.sleep(600)'], os.getpid()))\n"
                   "print(c.pid, flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert procs.alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while procs.alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not procs.alive(child)


# -- the supervisor over a stand-in ComfyUI (tests/fakeworkers.py) ---------------------------
async def test_workers_are_peers_restarted_when_killed_and_have_logs(tmp_path):
    async with lb_over_fake_workers(tmp_path, 2) as (url, cluster):
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/lb/backends/worker-0") as r:
                first = (await r.json())["worker"]
            assert first["state"] == "running" and first["restarts"] == 0
            os.kill(first["pid"], signal.SIGKILL)
            await wait_for(lambda: (cluster.peers["worker-0"].worker() or {})["restarts"] == 1
                           and cluster.peers["worker-0"].available, cluster, timeout=30)
            async with s.get(url + "/lb/backends/worker-0/log?lines=500") as r:
                body = await r.json()
            assert r.status == 200 and sum("stand-in ComfyUI" in line for line in body["lines"]) == 2
            async with s.post(url + "/lb/backends/worker-1/restart") as r:
                assert r.status == 202
            await wait_for(lambda: cluster.peers["worker-1"].worker()["restarts"] == 1
                           and cluster.peers["worker-1"].worker()["state"] == "running", cluster, timeout=30)
            async with s.delete(url + "/lb/backends/worker-1") as r:
                assert r.status == 409
            pids = [p.worker()["pid"] for p in cluster.peers.values()]
    assert all(pid and not procs.alive(pid) for pid in pids)


async def test_the_worker_routes_refuse_what_is_not_a_worker():
    async with lb_over_sims(1) as (url, sims, cluster):
        async with aiohttp.ClientSession() as s:
            for method, path, status in (("GET", "/lb/backends/nope/log", 404),
                                         ("POST", "/lb/backends/nope/restart", 404),
                                         ("GET", "/lb/backends/sim0/log", 400),
                                         ("POST", "/lb/backends/sim0/restart", 400)):
                async with s.request(method, url + path) as r:
                    assert r.status == status and "error" in await r.json(), (method, path)


# not a whole number, or out of range: "²" is str.isdigit() but no number to int(), and a
# number too long for int() (Python refuses strings beyond 4,300 digits) is a 400, not a 500
BAD_LINES = ("0", "-1", "abc", "99999", "", "²", " 5", "+5", "1_0", "1e3", "0x10", "9" * 5000, "5\x00")


async def test_the_log_route_checks_lines(tmp_path):
    async with lb_over_fake_workers(tmp_path) as (url, cluster):
        async with aiohttp.ClientSession() as s:
            for bad in BAD_LINES:
                async with s.get(url + "/lb/backends/worker-0/log", params={"lines": bad}) as r:
                    assert r.status == 400 and "error" in await r.json(), bad[:20]
            async with s.get(url + "/lb/backends/worker-0/log", params={"lines": "0007"}) as r:
                assert r.status == 200 and len((await r.json())["lines"]) <= 7


async def test_the_worker_routes_are_guarded_and_refuse_other_sites(tmp_path):
    async with lb_over_fake_workers(tmp_path, auth={"token": "s3cret"}) as (url, cluster):
        bearer = {"Authorization": "Bearer s3cret"}
        async with aiohttp.ClientSession() as s:
            for method, path in (("GET", "/log"), ("POST", "/restart")):
                async with s.request(method, url + "/lb/backends/worker-0" + path) as r:
                    assert r.status == 401, path
            for origin in ("http://evil.example", "null", url.replace("127.0.0.1", "localhost")):
                async with s.post(url + "/lb/backends/worker-0/restart", headers={**bearer, "Origin": origin}) as r:
                    assert r.status == 403 and "Origin" in (await r.json())["error"], origin
            async with s.get(url + "/lb/backends/worker-0/log", headers=bearer) as r:
                assert r.status == 200
        assert cluster.peers["worker-0"].worker()["restarts"] == 0  # no refused request restarted it
