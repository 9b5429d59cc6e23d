"""Local workers: ComfyUI processes this ComfyLB starts itself (one GPU each) and adds as
peers `worker-0`, `worker-1`, …, supervised: restarted with backoff when they exit, stopped
with the coordinator, and gone when the coordinator is (even after `kill -9`: on Linux each
worker asks the kernel for SIGTERM when its parent dies).

The pure parts (how many workers, which GPU each, argv and environment, backoff, a log's
last lines) take plain data and are unit-tested; `Worker` and `Workers` handle processes.
"""
from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .config import BackendConfig, ConfigError, WorkersConfig

if TYPE_CHECKING:
    from .dispatcher import Cluster

log = logging.getLogger(__name__)

PREFIX = "worker-"
HOST = "127.0.0.1"           # workers serve this coordinator only
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # seconds before restarting a worker that exited
STABLE_AFTER = 60.0          # a run at least this long was no crash loop: the backoff starts over
STOP_WITHIN = 10.0           # seconds a worker gets to exit on SIGTERM before SIGKILL
LOG_ROTATE_BYTES = 10 << 20  # a worker's log is moved to .1 at a (re)start beyond this size
TAIL_BYTES = 256 << 10       # how much of the log's end GET /lb/backends/{name}/log reads
LOG_LINES, MAX_LOG_LINES = 100, 2000
WORKER_ENV = "COMFYLB_WORKER"  # set in a worker: ComfyLB installed in its ComfyUI stays out of the way

# Run as `python -c PDEATHSIG <parent pid> <argv…>`: the kernel sends SIGTERM when the parent
# exits (kill -9 included), the setting survives the exec into ComfyUI, and a parent gone
# before the setting took hold is caught by comparing the parent's pid.
PDEATHSIG = ("import ctypes,os,signal,sys\n"
             "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
             "os.getppid() == int(sys.argv[1]) or sys.exit(1)\n"
             "os.execv(sys.argv[2], sys.argv[2:])\n")


# -- pure: plain data in, plain data out -------------------------------------------------
@dataclass
class Install:
    """The ComfyUI the workers run, and flags every worker inherits (the extension passes on
    its own --base-directory and model paths, so workers see the same models and nodes)."""
    comfyui: str
    python: str
    inherited: list[str] = field(default_factory=list)
    database_url: bool = True  # this ComfyUI knows --database-url (each worker gets its own file)


@dataclass
class WorkerPlan:
    name: str
    index: int
    port: int
    gpu: str | None
    home: Path
    argv: list[str]
    env: dict[str, str]
    cwd: str

    @property
    def log_path(self) -> Path:
        return self.home / "comfyui.log"

    def folders(self) -> list[Path]:
        return [self.home / d for d in ("input", "output", "temp", "user")]


def parse_nvidia_smi(text: str) -> list[str]:
    """Device ids from `nvidia-smi -L` ("GPU 0: NVIDIA … (UUID: GPU-…)" per line)."""
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", text, re.MULTILINE)]


def visible_gpus(environ: Mapping[str, str], smi_output: str | None) -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES when set (its entries, as the
    workers must name them), else every GPU nvidia-smi lists."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in (g.strip() for g in visible.split(",")) if g and g != "-1"]
    return parse_nvidia_smi(smi_output or "")


def uses_cpu(args: list[str]) -> bool:
    return "--cpu" in args


def _free(cfg: WorkersConfig, gpus: list[str], taken: str | None) -> list[str]:
    """The GPUs workers may have: the configured ones, else those found; less `taken`."""
    return [g for g in (cfg.gpus or gpus) if g != taken]


def worker_count(cfg: WorkersConfig, gpus: list[str], taken: str | None = None) -> tuple[int, str]:
    """How many workers, and why (for the log).  `auto`: one per GPU (`gpus`, else those
    found, less `taken`, the coordinator's own); with --cpu, one (a CPU ComfyUI already
    uses every core: more need a number); no GPU and no --cpu: none."""
    if isinstance(cfg.count, int):
        return cfg.count, f"workers.count is {cfg.count}"
    if uses_cpu(cfg.args):
        return 1, "count auto with --cpu: one worker (it uses every core)"
    free = _free(cfg, gpus, taken)
    if not free:
        return 0, ("count auto and no GPU found (none in CUDA_VISIBLE_DEVICES or nvidia-smi -L, or only the "
                   "coordinator's): no workers; add --cpu to args, or set count")
    return len(free), f"count auto: one per GPU ({', '.join(free)})"


def assign_gpus(count: int, cfg: WorkersConfig, gpus: list[str], taken: str | None = None) -> list[str | None]:
    """The device each worker gets through CUDA_VISIBLE_DEVICES, round robin over the free
    ones (more workers than GPUs share them); None: left as it is (--cpu, or no GPU known)."""
    free = _free(cfg, gpus, taken) or _free(cfg, gpus, None)
    if uses_cpu(cfg.args) or not free:
        return [None] * count
    return [free[i % len(free)] for i in range(count)]


def worker_argv(install: Install, port: int, home: Path, args: list[str]) -> list[str]:
    """ComfyUI's command line for one worker: its port on loopback and its own folders."""
    argv = [install.python, os.path.join(install.comfyui, "main.py"), "--listen", HOST, "--port", str(port),
            "--disable-auto-launch", *install.inherited,
            "--input-directory", str(home / "input"), "--output-directory", str(home / "output"),
            "--temp-directory", str(home / "temp"), "--user-directory", str(home / "user")]
    if install.database_url and not any(a.split("=", 1)[0] == "--database-url" for a in args):
        # ComfyUI's default database file is in its own folder: shared by every worker otherwise
        argv += ["--database-url", f"sqlite:///{home / 'user' / 'comfyui.db'}"]
    return argv + list(args)


def worker_env(base: Mapping[str, str], name: str, gpu: str | None) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k != "CUDA_VISIBLE_DEVICES" or gpu is None}
    env[WORKER_ENV] = name
    env["PYTHONUNBUFFERED"] = "1"  # its log shows what it did up to a crash
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def plan(cfg: WorkersConfig, install: Install, storage_dir: str, gpus: list[str], environ: Mapping[str, str],
         taken: str | None = None) -> list[WorkerPlan]:
    count, _ = worker_count(cfg, gpus, taken)
    root = Path(storage_dir).resolve() / "workers"
    plans = []
    for i, gpu in enumerate(assign_gpus(count, cfg, gpus, taken)):
        name, port, home = f"{PREFIX}{i}", cfg.base_port + i, root / f"{PREFIX}{i}"
        plans.append(WorkerPlan(name, i, port, gpu, home, worker_argv(install, port, home, cfg.args),
                                worker_env(environ, name, gpu), install.comfyui))
    return plans


def backoff(failures: int) -> float:
    """Seconds before the next start after `failures` quick exits in a row: 1, 2, 4, … 60."""
    return 0.0 if failures <= 0 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))


def tail(data: bytes, n: int) -> list[str]:
    """The last n lines of a log's text, whatever its bytes (a crash may cut a character)."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-n:] if n > 0 else []


def wrapped(argv: list[str], parent: int, platform: str = sys.platform) -> list[str]:
    """argv run through the PDEATHSIG wrapper on Linux (elsewhere as it is: no such call)."""
    if not platform.startswith("linux"):
        return list(argv)
    return [argv[0], "-c", PDEATHSIG, str(parent), *argv]


def check_install(comfyui: str, python: str, path: str = "workers") -> None:
    """A ComfyUI folder with main.py and a Python that runs, or the ConfigError saying which."""
    if not comfyui:
        raise ConfigError(f"{path}.comfyui", "required by the standalone balancer: the ComfyUI folder (with main.py)")
    if not python:
        raise ConfigError(f"{path}.python", "required by the standalone balancer: the Python that runs ComfyUI")
    if not os.path.isfile(os.path.join(comfyui, "main.py")):
        raise ConfigError(f"{path}.comfyui", f"no main.py in {comfyui!r}: expected the ComfyUI folder")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)) and shutil.which(python) is None:
        raise ConfigError(f"{path}.python", f"{python!r} is not an executable")


def knows_flag(comfyui: str, flag: str) -> bool:
    """Whether this ComfyUI's command line has `flag` (an older one refuses unknown flags)."""
    try:
        return flag in Path(comfyui, "comfy", "cli_args.py").read_text(errors="replace")
    except OSError:
        return False


# -- processes -----------------------------------------------------------------------------
def detect_gpus(environ: Mapping[str, str]) -> list[str]:
    if "CUDA_VISIBLE_DEVICES" in environ or shutil.which("nvidia-smi") is None:
        return visible_gpus(environ, None)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("workers: nvidia-smi -L failed (%s): no GPU assumed", e)
        out = ""
    return visible_gpus(environ, out)


class Worker:
    """One supervised ComfyUI: started, restarted with backoff when it exits, stopped."""

    def __init__(self, plan: WorkerPlan, on_change: Callable[[], None]) -> None:
        self.plan = plan
        self.on_change = on_change
        self.proc: asyncio.subprocess.Process | None = None
        self.state = "starting"   # running | waiting (to start again) | stopped
        self.restarts = 0
        self.failures = 0         # quick exits in a row: the backoff
        self.last_exit: int | None = None
        self.last_error: str | None = None
        self.started_at = 0.0
        self.retry_at: float | None = None
        self._stopping = False
        self._now = False         # restart asked for: no backoff
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def _prepare(self) -> None:
        for folder in self.plan.folders():
            folder.mkdir(parents=True, exist_ok=True)
        logfile = self.plan.log_path
        if logfile.exists() and logfile.stat().st_size > LOG_ROTATE_BYTES:
            logfile.replace(logfile.with_suffix(".log.1"))

    async def _spawn(self) -> None:
        await asyncio.to_thread(self._prepare)
        with open(self.plan.log_path, "ab") as out:
            out.write(f"--- ComfyLB: starting {self.name}: {' '.join(self.plan.argv)}\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *wrapped(self.plan.argv, os.getpid()), cwd=self.plan.cwd, env=self.plan.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at, self.state, self.retry_at, self.last_error = time.monotonic(), "running", None, None
        log.info("%s started (pid %d, port %d%s); log: %s", self.name, self.proc.pid, self.plan.port,
                 f", GPU {self.plan.gpu}" if self.plan.gpu is not None else "", self.plan.log_path)
        self.on_change()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._spawn()
                assert self.proc is not None
                if self._stopping:  # stop() came while it was being started: it found no process to end
                    await self._end()
                self.last_exit = await self.proc.wait()
            except OSError as e:
                self.proc = None  # counts as a quick exit: the backoff grows
                self.last_error = f"cannot start: {e}"
                log.error("%s: %s", self.name, self.last_error)
            if self._stopping:
                break
            await self._pause()
        self.state = "stopped"
        self.on_change()

    async def _pause(self) -> None:
        """Between an exit and the next start: the backoff, cut short by a restart asked for."""
        quick = self.proc is None or time.monotonic() - self.started_at < STABLE_AFTER
        self.failures = 0 if self._now or not quick else self.failures + 1
        delay = backoff(self.failures)
        if not self._now:
            log.warning("%s exited (code %s); starting it again in %.0f s", self.name, self.last_exit, delay)
        self._now = False
        self.state, self.retry_at = "waiting", time.time() + delay
        self.on_change()
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass
        self.restarts += 1

    def _signal(self, sig: int) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, sig)  # its own session: whatever it started goes too
            except (ProcessLookupError, PermissionError):
                pass

    async def _end(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_WITHIN."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_WITHIN)
        except asyncio.TimeoutError:
            log.warning("%s did not exit within %.0f s of SIGTERM: killed", self.name, STOP_WITHIN)
            self._signal(signal.SIGKILL)
            await proc.wait()

    async def restart(self) -> None:
        """Stop it (if running) and start it again at once, whatever the backoff."""
        log.info("%s: restart asked for", self.name)
        self._now = True
        self._wake.set()
        await self._end()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await self._end()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def kill_now(self) -> None:
        """At interpreter exit, when the loop is gone (see Workers.start)."""
        self._signal(signal.SIGTERM)

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "pid": self.pid, "port": self.plan.port, "gpu": self.plan.gpu,
                "restarts": self.restarts, "last_exit": self.last_exit, "last_error": self.last_error,
                "retry_at": self.retry_at, "log": str(self.plan.log_path)}

    def read_log(self, n: int) -> list[str]:
        try:
            with open(self.plan.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - TAIL_BYTES))
                data = f.read()
        except OSError:
            return []
        if size > TAIL_BYTES:
            data = data.split(b"\n", 1)[-1]  # a cut first line says nothing
        return tail(data, n)


class Workers:
    """Every local worker of this coordinator."""

    def __init__(self, plans: list[WorkerPlan]) -> None:
        self.plans = plans
        self.workers: dict[str, Worker] = {}

    def get(self, name: str) -> Worker | None:
        return self.workers.get(name)

    async def start(self, cluster: "Cluster", cfg: WorkersConfig) -> None:
        for p in self.plans:
            if p.name in cluster.peers:
                log.error("%s not started: a peer of that name exists already (added at runtime?); remove it "
                          "with DELETE /lb/backends/%s and restart", p.name, p.name)
                continue
            worker = Worker(p, cluster.changed)
            self.workers[p.name] = worker
            worker.start()
            peer = cluster.add_peer(BackendConfig(name=p.name, host=HOST, port=p.port, max_queue=cfg.max_queue,
                                                  weight=cfg.weight))
            peer.source = "worker"
            peer.worker = worker.describe
        if self.workers:
            atexit.register(self._kill_all)
            log.info("started %d local worker(s): %s", len(self.workers), ", ".join(self.workers))

    def _kill_all(self) -> None:
        for w in self.workers.values():
            w.kill_now()

    async def stop(self) -> None:
        if self.workers:
            log.info("stopping %d local worker(s)", len(self.workers))
            await asyncio.gather(*(w.stop() for w in self.workers.values()))
            atexit.unregister(self._kill_all)


def resolve(cfg: WorkersConfig, install: Install, storage_dir: str, taken: str | None = None,
            environ: Mapping[str, str] | None = None) -> Workers:
    """The workers to start, decided now (GPUs detected), the decision logged."""
    if not cfg.enabled:
        return Workers([])
    environ = os.environ if environ is None else environ
    gpus = [] if uses_cpu(cfg.args) or cfg.gpus else detect_gpus(environ)
    count, why = worker_count(cfg, gpus, taken)
    (log.info if count else log.warning)("workers: %d (%s)", count, why)
    return Workers(plan(cfg, install, storage_dir, gpus, environ, taken))
