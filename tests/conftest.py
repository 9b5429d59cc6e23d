"""Session-wide real parts: ComfyUI peers started once, in parallel, and shared."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests import procs

N_PEERS = 3
COORD_TOKEN = "coord-s3cret"  # auth.token of the coord_auth coordinator


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


@pytest.fixture(scope="session")
def balancer(peers, workdir):
    """The standalone balancer, as a user starts it, over the first two real peers."""
    with procs.running_balancer(workdir, "lb", [peer_backend(p, max_queue=2) for p in peers[:2]]) as lb:
        yield lb


def coordinator(comfy_env, workdir, name: str, config: dict | None,
                extra_args: list[str] | None = None) -> procs.Proc:
    environ = {}
    if config is not None:
        path = workdir / f"{name}.yaml"
        # its own state, as each ComfyUI's own custom_nodes/comfylb/config.yaml would have
        path.write_text(yaml.safe_dump({"storage": {"dir": f"{name}-data"}, **config}))
        environ["COMFYLB_CONFIG"] = str(path)
    else:
        environ["COMFYLB_CONFIG"] = str(workdir / f"{name}-absent.yaml")
    # A first start would open the template browser over the UI the browser tests drive.
    settings = workdir / name / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return procs.start_comfyui(comfy_env, name, workdir, custom_nodes={"comfylb": procs.REPO}, environ=environ,
                               extra_args=extra_args)


@pytest.fixture(scope="session")
def coordinators(comfy_env, workdir, peers):
    hc = {"interval": 1.0, "timeout": 2.0}
    started = {
        # listening beyond loopback without a token: /lb/* answers this machine only
        "coord": coordinator(comfy_env, workdir, "coord", {
            "health_check": hc,
            "backends": [peer_backend(peers[0], max_queue=1, tags=["gpu24"]), peer_backend(peers[1], max_queue=1)]},
            extra_args=["--listen", "0.0.0.0"]),
        "coord_local": coordinator(comfy_env, workdir, "coord_local", {
            "health_check": hc, "local": {"enabled": True, "max_queue": 1},
            "backends": [peer_backend(peers[2], max_queue=1)]}),
        "stock": coordinator(comfy_env, workdir, "stock", None),
        # /lb/* behind a token: the panel's session cookie, in the browser tests
        "coord_auth": coordinator(comfy_env, workdir, "coord_auth", {
            "health_check": hc, "auth": {"token": COORD_TOKEN}, "backends": [peer_backend(peers[2], max_queue=1)]}),
    }
    try:
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(lambda p: p.wait_ready("/system_stats", 180), started.values()))
        procs.wait_backends(started["coord"], {peers[0].name, peers[1].name})
        procs.wait_backends(started["coord_local"], {peers[2].name, "local"})
        procs.wait_backends(started["coord_auth"], {peers[2].name}, token=COORD_TOKEN)
        yield started
    finally:
        for p in started.values():
            p.stop()


@pytest.fixture(scope="session")
def coordinator_current(comfy_env, workdir, peers):
    """A coordinator serving today's web UI (comfyui-frontend-package 1.58.1, through
    --front-end-root) on the same 0.3.75 backend, over the first two real peers."""
    proc = coordinator(comfy_env, workdir, "coord_current", {
        "health_check": {"interval": 1.0, "timeout": 2.0},
        "backends": [peer_backend(peers[0], max_queue=1), peer_backend(peers[1], max_queue=1)],
    }, extra_args=["--front-end-root", comfy_env["frontend_current"]])
    try:
        proc.wait_ready("/system_stats", 180)
        procs.wait_backends(proc, {peers[0].name, peers[1].name})
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (tests/pg.py); each test takes a fresh
    database on it with postgres.database(name)."""
    from tests import pg

    server = pg.start()
    yield server
    server.stop()
