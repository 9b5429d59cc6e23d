"""The configuration file: schema, defaults and validation.

Pure: turns a mapping (parsed YAML) into typed, validated settings.  Every error names
the file and the field, so the CLI can print one line and stop.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from .textenum import TextEnum



class Strategy(TextEnum):
    """Which peer gets the next prompt (scheduler.py)."""
    LEAST_BUSY = "least_busy"
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"


class Order(TextEnum):
    """Which queued prompt goes next: ComfyUI's order, or predicted longest first (batch makespan)."""
    FIFO = "fifo"
    LONGEST_FIRST = "longest_first"


STRATEGIES = Strategy.names()
ROLES = ("coordinator", "peer")
ORDERS = Order.names()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A bad setting: `str(err)` is one line naming the file and the field."""

    def __init__(self, field: str, message: str, source: str | None = None):
        self.field, self.message, self.source = field, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


@dataclass
class ServerConfig:
    # Loopback, as ComfyUI: listening beyond it needs a token (or auth.allow_open).
    host: str = "127.0.0.1"
    port: int = 8100
    debug: bool = False
    # Standalone: the peer that answers ComfyUI routes the balancer does not own (users,
    # settings, userdata, templates, …); "" = the first enabled peer in the config.
    forward_to: str = ""
    # Each client gets one prompt's messages at a time, in queue order, as from one ComfyUI
    # (execution stays parallel); false: every message as it comes.  A client can opt in
    # to that itself with the feature flag `comfylb_interleave`.
    ordered_delivery: bool = True
    # Origins ("https://ui.example.org") besides the balancer's own whose pages may change
    # state (POST, DELETE, /ws …); any other Origin gets 403.  Scripts send none and pass.
    allowed_origins: list = field(default_factory=list)
    # With storage.url, how the other coordinators reach this one when it leads (they pass
    # their clients on to it); "" = http://<host>:<port>, the machine's name for 0.0.0.0.
    advertise_url: str = ""

    def advertised(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"


@dataclass
class SchedulerConfig:
    strategy: Strategy = Strategy.LEAST_BUSY
    prefer_idle: bool = True
    affinity: bool = True  # keep prompts on peers that already have their models loaded
    order: Order = Order.FIFO


@dataclass
class HealthCheckConfig:
    interval: float = 5.0
    timeout: float = 3.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 1


@dataclass
class QueueConfig:
    max_size: int = 1000
    retry_interval: float = 1.0
    max_retries: int = 1  # a prompt that took down two peers is not given a third


@dataclass
class BackendConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 8188
    weight: float = 1
    max_queue: int = 10
    enabled: bool = True
    scheme: str = "http"
    tags: list = field(default_factory=list)      # what a routing node may ask for, e.g. [gpu24]
    headers: dict = field(default_factory=dict)   # sent with every request to the peer
    token: str = ""        # peer behind an auth proxy: sent as "Authorization: Bearer <token>"
    basic_auth: str = ""   # or "user:password" for HTTP basic auth

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass
class LocalConfig:
    # Extension mode: the coordinator ComfyUI itself as one more peer.
    enabled: bool = False
    weight: float = 1
    max_queue: int = 1


@dataclass
class StorageConfig:
    # Where the coordinator keeps uploaded inputs and its state.
    dir: str = "comfylb-data"
    # SQLite file for the queue, tasks, history and runtime peers (relative to dir);
    # ":memory:" keeps nothing across restarts.
    database: str = "comfylb.db"
    # postgresql://user:password@host:port/db keeps the state in PostgreSQL instead ("":
    # the embedded SQLite above).  Uploads and output copies stay in dir.
    url: str = ""
    # Outputs kept on the coordinator for /view (0 = keep none): copied from the peer when
    # first viewed, or when their prompt finishes (prefetch_outputs).
    view_cache_mb: int = 2048
    prefetch_outputs: bool = True
    # Peers added at runtime (POST /lb/backends, the panel) come back after a restart;
    # false: the config alone says which peers there are, and those are forgotten.
    keep_runtime_peers: bool = True


@dataclass
class AuthConfig:
    # Bearer token required on /lb/* ("" = none; the COMFYLB_TOKEN environment variable
    # is used when this is empty).  Without it, api_token guards /lb/* too.
    token: str = ""
    # Standalone only: a token for ComfyUI's client API and /ws too, for a balancer exposed
    # beyond localhost (header "Authorization: Bearer <t>" or "?token=<t>").  "" = open;
    # COMFYLB_API_TOKEN is used when this is empty.
    api_token: str = ""
    # Listen beyond loopback with no token at all, on purpose (else the standalone balancer
    # refuses to start, and the extension answers /lb/* to this machine only).
    allow_open: bool = False
    # Shared with the ComfyLB agents on peers (role: peer): lets this coordinator copy model
    # files between peers.  Each agent's config has the same value.  "" = no copies.
    agent_secret: str = ""


class Provision(TextEnum):
    """What happens to a prompt naming a model only busy peers have."""
    OFF = "off"              # it waits for one of them
    ON_DEMAND = "on_demand"  # the model is copied to an idle agent peer, unless waiting is quicker


@dataclass
class ProvisioningConfig:
    models: Provision = Provision.OFF
    copies_at_once: int = 2
    # what a copy is expected to take, before one has been measured: bytes/s between peers
    expected_mb_per_s: float = 100.0


@dataclass
class WorkersConfig:
    # Local workers (workers.py): ComfyUI processes this ComfyLB starts, one GPU each, and
    # adds as peers worker-0, worker-1, …  count: a number, or "auto" (see workers.py).
    count: int | str = 0
    base_port: int = 8190          # worker-i listens on 127.0.0.1:base_port+i
    gpus: list = field(default_factory=list)  # CUDA device ids to spread them over ([] = detected)
    args: list = field(default_factory=list)  # more ComfyUI flags, e.g. ["--cpu"]
    comfyui: str = ""              # the ComfyUI folder (with main.py); extension: its own
    python: str = ""               # the Python that runs it; extension: its own
    max_queue: int = 1
    weight: float = 1

    @property
    def enabled(self) -> bool:
        return self.count != 0


# Flags ComfyLB sets for each worker itself (a second value would silently win or clash).
WORKER_OWN_FLAGS = ("--port", "--listen", "--input-directory", "--output-directory", "--temp-directory",
                    "--user-directory", "--cuda-device")
WORKER_NAME = re.compile(r"^worker-[0-9]+$")


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    backends: list[BackendConfig] = field(default_factory=list)
    # coordinator: balances prompts over its peers; peer: this ComfyUI is a peer and ComfyLB
    # only runs its agent (agent.py), which needs auth.agent_secret
    role: str = "coordinator"
    source: str | None = None


# read as text; checked against their members once the section is read
_TYPES = {"float": float, "int": int, "bool": bool, "str": str, "list": list, "dict": dict, "Strategy": str,
          "Order": str, "Provision": str}


def _check_type(path: str, value: Any, typ: type) -> Any:
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"expected a non-empty string, got {value!r}")
        return value
    if typ is list:  # lists of names (tags)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(path, f"expected a list of names, got {value!r}")
        return list(value)
    if typ is dict:  # string to string (HTTP headers)
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(path, f"expected a mapping of names to strings, got {value!r}")
        return dict(value)
    raise AssertionError(typ)


def _section(cls: Any, raw: Any, path: str, **extra: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(extra)
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{path}.{key}", f"unknown setting (known: {', '.join(fields)})")
        if value == "" and fields[key].default == "":
            values[key] = ""  # optional strings ("" = not set)
            continue
        values[key] = _check_type(f"{path}.{key}", value, _TYPES[str(fields[key].type)])
    try:
        return cls(**values)
    except TypeError:
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
        raise ConfigError(f"{path}.{missing[0]}", "is required") from None


def check_port(path: str, port: int) -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(path, f"port must be 1-65535, got {port}")
    return port


def check_origin(path: str, origin: str) -> str:
    """A browser origin, as a browser sends it in `Origin`: scheme://host[:port], lowercase."""
    origin = origin.strip().lower().rstrip("/")
    scheme, sep, netloc = origin.partition("://")
    if scheme not in ("http", "https") or not sep or not netloc or "/" in netloc or "?" in netloc or "#" in netloc:
        raise ConfigError(path, f"expected an origin like https://ui.example.org, got {origin!r}")
    return origin


def parse_backend(raw: Any, path: str = "backend") -> BackendConfig:
    """A peer definition, from the config file or from `POST /lb/backends`."""
    if isinstance(raw, dict) and "name" in raw and not isinstance(raw["name"], str):
        raise ConfigError(f"{path}.name", f"expected a non-empty string, got {raw['name']!r}")
    if isinstance(raw, dict) and isinstance(raw.get("host"), str) and "://" in raw["host"]:
        raw = dict(raw)
        scheme, _, rest = raw["host"].partition("://")
        if scheme not in ("http", "https"):
            raise ConfigError(f"{path}.host", f"only http and https peers are supported, got {scheme!r}")
        raw["scheme"], raw["host"] = scheme, rest.rstrip("/")
    b = _section(BackendConfig, raw, path)
    if not _NAME.match(b.name):
        raise ConfigError(f"{path}.name", "use letters, digits, '-', '_' or '.' (at most 64)")
    if b.scheme not in ("http", "https"):
        raise ConfigError(f"{path}.scheme", f"only http and https peers are supported, got {b.scheme!r}")
    if "/" in b.host or not b.host.strip():
        raise ConfigError(f"{path}.host", f"expected a host name or address, got {b.host!r}")
    check_port(f"{path}.port", b.port)
    if b.weight <= 0:
        raise ConfigError(f"{path}.weight", f"must be greater than 0, got {b.weight}")
    if b.max_queue < 1:
        raise ConfigError(f"{path}.max_queue", f"must be at least 1, got {b.max_queue}")
    if b.token and b.basic_auth:
        raise ConfigError(f"{path}.token", "use either token or basic_auth, not both")
    if b.basic_auth and ":" not in b.basic_auth:
        raise ConfigError(f"{path}.basic_auth", "expected user:password")
    return b


def peer_headers(b: BackendConfig) -> dict[str, str]:
    """Every header a request to the peer carries, credentials included."""
    headers = dict(b.headers)
    if b.token:
        headers["Authorization"] = f"Bearer {b.token}"
    elif b.basic_auth:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(b.basic_auth.encode()).decode()
    return headers


def parse(raw: Any, source: str | None = None) -> Config:
    try:
        return _parse(raw, source)
    except ConfigError as e:
        raise ConfigError(e.field, e.message, source) from None


def _parse(raw: Any, source: str | None) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "expected a mapping of sections")
    known = {"server", "scheduler", "health_check", "queue", "storage", "auth", "local", "workers", "backends",
             "provisioning", "role"}
    for key in raw:
        if key not in known:
            raise ConfigError(str(key), f"unknown section (known: {', '.join(sorted(known))})")
    cfg = Config(
        server=_section(ServerConfig, raw.get("server"), "server"),
        scheduler=_section(SchedulerConfig, raw.get("scheduler"), "scheduler"),
        health_check=_section(HealthCheckConfig, raw.get("health_check"), "health_check"),
        queue=_section(QueueConfig, raw.get("queue"), "queue"),
        storage=_section(StorageConfig, raw.get("storage"), "storage"),
        auth=_section(AuthConfig, raw.get("auth"), "auth"),
        local=_section(LocalConfig, raw.get("local"), "local"),
        workers=parse_workers(raw.get("workers")),
        provisioning=_section(ProvisioningConfig, raw.get("provisioning"), "provisioning"),
        role=raw.get("role", "coordinator"),
        source=source,
    )
    if cfg.role not in ROLES:
        raise ConfigError("role", f"expected one of {', '.join(ROLES)}, got {cfg.role!r}")
    if cfg.role == "peer" and not cfg.auth.agent_secret:
        raise ConfigError("auth.agent_secret", "role: peer needs the secret its coordinator has in auth.agent_secret")
    if cfg.auth.agent_secret and len(cfg.auth.agent_secret) < 16:
        raise ConfigError("auth.agent_secret", "use at least 16 characters (it guards writing model files)")
    prov = cfg.provisioning
    if prov.models not in Provision.names():
        raise ConfigError("provisioning.models", f"expected one of {', '.join(Provision.names())}, got {prov.models!r}")
    prov.models = Provision(prov.models)
    if prov.copies_at_once < 1 or prov.expected_mb_per_s <= 0:
        raise ConfigError("provisioning", "copies_at_once must be at least 1 and expected_mb_per_s greater than 0")
    if prov.models == Provision.ON_DEMAND and not cfg.auth.agent_secret:
        raise ConfigError("provisioning.models", "on_demand copies models through agents: set auth.agent_secret")
    check_port("server.port", cfg.server.port)
    cfg.server.allowed_origins = [check_origin(f"server.allowed_origins[{i}]", o)
                                  for i, o in enumerate(cfg.server.allowed_origins)]
    if cfg.scheduler.order not in ORDERS:
        raise ConfigError("scheduler.order", f"unknown order {cfg.scheduler.order!r} (one of {', '.join(ORDERS)})")
    if cfg.scheduler.strategy not in STRATEGIES:
        raise ConfigError("scheduler.strategy",
                          f"unknown strategy {cfg.scheduler.strategy!r} (one of {', '.join(STRATEGIES)})")
    cfg.scheduler.order, cfg.scheduler.strategy = Order(cfg.scheduler.order), Strategy(cfg.scheduler.strategy)
    if cfg.storage.url and not re.match(r"^postgres(ql)?://[^/\s]*/?\S*$", cfg.storage.url):
        raise ConfigError("storage.url", "expected postgresql://user:password@host:port/database")
    hc = cfg.health_check
    for name in ("interval", "timeout"):
        if getattr(hc, name) <= 0:
            raise ConfigError(f"health_check.{name}", "must be greater than 0")
    for name in ("unhealthy_threshold", "healthy_threshold"):
        if getattr(hc, name) < 1:
            raise ConfigError(f"health_check.{name}", "must be at least 1")
    if cfg.local.max_queue < 1 or cfg.local.weight <= 0:
        raise ConfigError("local", "max_queue must be at least 1 and weight greater than 0")
    if cfg.queue.max_size < 1:
        raise ConfigError("queue.max_size", "must be at least 1")
    if cfg.queue.retry_interval < 0:
        raise ConfigError("queue.retry_interval", "must not be negative")
    if cfg.queue.max_retries < 0:
        raise ConfigError("queue.max_retries", "must not be negative")
    backends = raw.get("backends") or []
    if not isinstance(backends, list):
        raise ConfigError("backends", "expected a list of peers")
    seen: set[str] = set()
    for i, item in enumerate(backends):
        b = parse_backend(item, f"backends[{i}]")
        if b.name in seen:
            raise ConfigError(f"backends[{i}].name", f"duplicate backend name {b.name!r}")
        seen.add(b.name)
        if cfg.workers.enabled and WORKER_NAME.match(b.name):
            raise ConfigError(f"backends[{i}].name", f"{b.name!r} is the name of a local worker (workers:); rename it")
        cfg.backends.append(b)
    return cfg


def parse_workers(raw: Any, path: str = "workers") -> WorkersConfig:
    """The workers section; count and gpus take numbers or text, so they are read here."""
    if not isinstance(raw, dict):
        return _section(WorkersConfig, raw, path)  # None: no workers; anything else: its error
    raw = dict(raw)
    count, gpus = raw.pop("count", 0), raw.pop("gpus", [])
    if count != "auto" and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ConfigError(f"{path}.count", f"expected a number of workers (0 or more) or auto, got {count!r}")
    if not isinstance(gpus, list) or not all(isinstance(g, (int, str)) and not isinstance(g, bool)
                                             and str(g).strip() for g in gpus):
        raise ConfigError(f"{path}.gpus", f"expected a list of CUDA device ids like [0, 1], got {gpus!r}")
    w = _section(WorkersConfig, raw, path, count=count, gpus=[str(g).strip() for g in gpus])
    check_port(f"{path}.base_port", w.base_port)
    last = w.base_port + (w.count if isinstance(w.count, int) else max(len(w.gpus), 1)) - 1
    if last > 65535:
        raise ConfigError(f"{path}.base_port", f"{w.count} workers from port {w.base_port} go past 65535")
    for flag in w.args:
        if flag.split("=", 1)[0] in WORKER_OWN_FLAGS:
            raise ConfigError(f"{path}.args", f"{flag.split('=', 1)[0]} is set by ComfyLB for each worker; leave it out")
    if w.max_queue < 1 or w.weight <= 0:
        raise ConfigError(path, "max_queue must be at least 1 and weight greater than 0")
    return w


def load(path: str | os.PathLike) -> Config:
    """Read and validate a YAML config file."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError("(file)", "not found", path) from None
    except OSError as e:
        raise ConfigError("(file)", e.strerror or str(e), path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise ConfigError(where, f"not valid YAML: {getattr(e, 'problem', None) or e}", path) from None
    return parse(raw, path)
