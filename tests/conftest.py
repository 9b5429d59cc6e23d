"""Session-wide real parts: ComfyUI peers started once, in parallel, and shared."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import procs

N_PEERS = 3


@pytest.fixture(scope="session")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="comfylb-tests-"))
    yield d
    if not os.environ.get("COMFYLB_KEEP_TEST_DIR"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def comfy_env():
    return procs.comfyui_env()


@pytest.fixture(scope="session")
def peers(comfy_env, workdir):
    """Real ComfyUI peers (CPU, ComfyUI's testing nodes), started together."""
    started = [procs.start_comfyui(comfy_env, f"peer{i}", workdir) for i in range(1, N_PEERS + 1)]
    try:
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(lambda p: p.wait_ready("/system_stats", 180), started))
        yield started
    finally:
        for p in started:
            p.stop()


def peer_backend(p: procs.Proc, **kw) -> dict:
    return {"name": p.name, "host": "127.0.0.1", "port": p.port, **kw}


def wait_backends(lb: procs.Proc, names: set[str], timeout: float = 60) -> None:
    """Until the balancer reports every named peer available (linked and healthy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(lb.url + "/lb/backends", timeout=2) as r:
                got = {b["name"] for b in json.load(r)["backends"] if b["available"]}
            if names <= got:
                return
        except OSError:
            pass
        if lb.popen.poll() is not None:
            raise RuntimeError(f"balancer exited; log:\n{lb.tail()}")
        time.sleep(0.1)
    raise RuntimeError(f"peers {names} not available in time; log:\n{lb.tail()}")


@pytest.fixture(scope="session")
def balancer(peers, workdir):
    """The standalone balancer, as a user starts it, over the first two real peers."""
    lb = procs.start_balancer(workdir, "lb", [peer_backend(p, max_queue=2) for p in peers[:2]])
    try:
        lb.wait_ready("/system_stats", 30)
        wait_backends(lb, {p.name for p in peers[:2]})
        yield lb
    finally:
        lb.stop()
