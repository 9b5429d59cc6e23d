"""Real processes for the integration tests: ComfyUI peers and the standalone balancer."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import yaml

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
# Model-free workflows, and the traffic recorded from a real ComfyUI (transcript.md).
DATA = REPO / "tests" / "data"
WORKFLOWS = DATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """A port with the n-1 after it free too (bound and released: best effort)."""
    for _ in range(50):
        base = free_port()
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that is gone (reaped by init soon)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    port: int
    popen: subprocess.Popen
    log: Path
    home: Path | None = None
    argv: list[str] = field(default_factory=list)
    cwd: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, path: str, timeout: float) -> None:
        """Block until the server answers `path` (it reports readiness no other way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log:\n{self.tail()}")
            if http_ok(self.url + path):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; log:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)

    def restart(self) -> None:
        self.stop()
        self.popen = _spawn(self.argv, self.log, self.cwd)


def _spawn(argv: list[str], log: Path, cwd: str | None, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)


def comfyui_env() -> dict:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "comfyui_env.py")], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_comfyui(env: dict, name: str, workdir: Path, port: int | None = None,
                  extra_args: list[str] | None = None, custom_nodes: dict[str, Path] | None = None,
                  environ: dict[str, str] | None = None) -> Proc:
    """One real ComfyUI on CPU with ComfyUI's own testing nodes (TestSleep & co.)."""
    home = workdir / name
    (home / "custom_nodes").mkdir(parents=True, exist_ok=True)
    # ComfyUI's own example node (SaveImageWebsocket) lives in the tree's custom_nodes/,
    # which --base-directory hides: give each instance a copy.
    example = Path(env["tree"]) / "custom_nodes" / "websocket_image_save.py"
    if example.exists():
        shutil.copy(example, home / "custom_nodes" / example.name)
    for link, target in (custom_nodes or {}).items():
        dest = home / "custom_nodes" / link
        if not dest.exists():
            dest.symlink_to(target, target_is_directory=True)
    port = port or free_port()
    argv = [env["python"], "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--disable-auto-launch", "--base-directory", str(home), "--database-url", "sqlite:///:memory:",
            "--extra-model-paths-config", "tests/execution/extra_model_paths.yaml", *(extra_args or [])]
    log = workdir / f"{name}.log"
    child_env = {**os.environ, **environ} if environ else None
    return Proc(name, port, _spawn(argv, log, env["tree"], child_env), log, home, argv, env["tree"])


def start_balancer(workdir: Path, name: str, backends: list[dict], **sections) -> Proc:
    port = free_port()
    cfg = {"health_check": {"interval": 1.0, "timeout": 2.0, "unhealthy_threshold": 2, "healthy_threshold": 1},
           "storage": {"dir": str(workdir / f"{name}-data")},
           "backends": backends, **sections}
    cfg["server"] = {**sections.get("server", {}), "host": "127.0.0.1", "port": port}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "comfylb_ext", "-c", str(path)]
    log = workdir / f"{name}.log"
    proc = Proc(name, port, _spawn(argv, log, str(REPO)), log, argv=argv, cwd=str(REPO))
    return proc


def wait_backends(lb: Proc, names: set[str], timeout: float = 60, token: str = "") -> None:
    """Until the balancer reports every named peer available (linked and healthy)."""
    deadline = time.monotonic() + timeout
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(lb.url + "/lb/backends", headers=auth)
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                got = {b["name"] for b in json.load(r)["backends"] if b["available"]}
            if names <= got:
                return
        except OSError:
            pass
        if lb.popen.poll() is not None:
            raise RuntimeError(f"balancer exited; log:\n{lb.tail()}")
        time.sleep(0.1)
    raise RuntimeError(f"peers {names} not available in time; log:\n{lb.tail()}")


@contextlib.contextmanager
def running_balancer(workdir: Path, name: str, backends: list[dict], **sections):
    """The standalone balancer, started as a user starts it, once every peer is available."""
    lb = start_balancer(workdir, name, backends, **sections)
    auth = sections.get("auth", {})
    try:
        lb.wait_ready("/lb/state", 30)
        wait_backends(lb, {b["name"] for b in backends}, token=auth.get("token") or auth.get("api_token", ""))
        yield lb
    finally:
        lb.stop()


def until(cond: Callable[[], T], what: str, proc: Proc, timeout: float = 60) -> T:
    """Poll until cond() is truthy and return its value (an OSError, e.g. a refused or 5xx
    request, counts as not yet), or fail saying what was awaited, with `proc`'s log.  For
    states nothing announces to a test outside the process (a pid gone, a worker back)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s; log:\n{proc.tail()}")


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())
