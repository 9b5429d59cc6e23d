"""`python -m comfylb_ext -c config.yaml [-H 127.0.0.1] [-p 8100]` — the standalone balancer."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import tempfile

from aiohttp import web

from . import __version__
from .access import configured_tokens, exposure_problem, is_loopback_host
from .config import Config, ConfigError, check_port, load
from .leadership import Leadership
from .store import StoreError

log = logging.getLogger("comfylb_ext")
# Seconds requests still in progress at SIGTERM get to finish (aiohttp's default is 60):
# the state is in the database already, and a client retries or reconnects.
SHUTDOWN_WITHIN = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="comfylb", description="Load balancer for ComfyUI: one endpoint, many peers.")
    ap.add_argument("-c", "--config", help="YAML config file (see config.example.yaml)")
    ap.add_argument("-H", "--host", help="address to listen on (overrides server.host)")
    ap.add_argument("-p", "--port", type=int, help="port to listen on (overrides server.port)")
    ap.add_argument("--debug", action="store_true", help="verbose logs (overrides server.debug)")
    ap.add_argument("--demo", action="store_true",
                    help="run over two SIMULATED peers started in this process (no GPU, no ComfyUI needed)")
    ap.add_argument("--version", action="version", version=f"comfylb {__version__}")
    return ap.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    cfg = load(args.config) if args.config else Config()
    if cfg.role == "peer":
        raise ConfigError("role", "peer: the agent runs inside the peer's ComfyUI (ComfyLB in its custom_nodes); "
                                  "the standalone balancer is a coordinator", cfg.source)
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = check_port("--port", args.port)
    if args.debug:
        cfg.server.debug = True
    if cfg.workers.enabled:
        from .workers import check_install

        try:
            check_install(cfg.workers.comfyui, cfg.workers.python)
        except ConfigError as e:
            raise ConfigError(e.field, e.message, cfg.source) from None
    return cfg


async def _demo_peers(cfg: Config) -> list:
    from .config import BackendConfig
    from .sim import start_sim

    sims = []
    for i in (1, 2):
        server = await start_sim(port=0, name=f"sim-{i}")
        sims.append(server)
        cfg.backends.append(BackendConfig(name=f"sim-{i}", host="127.0.0.1", port=server.port, max_queue=2))
    log.info("demo: two SIMULATED ComfyUI peers (no real ComfyUI, no GPU): %s",
             ", ".join(b.url for b in cfg.backends[-2:]))
    return sims


async def _listen(app: web.Application, cfg: Config) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_WITHIN,
                           access_log=logging.getLogger("aiohttp.access") if cfg.server.debug else None)
    await runner.setup()
    # with storage.url the leader opens its port while the stand-by it was still listens
    # there, so that clients never find it closed
    await web.TCPSite(runner, cfg.server.host, cfg.server.port, reuse_port=bool(cfg.storage.url) or None).start()
    return runner


async def _stand_by(cfg: Config, lead: Leadership, stop: asyncio.Event) -> web.AppRunner | None:
    """Pass clients on to the leader until this coordinator leads (its stand-by runner, to
    close once the leader's is listening), or until it stops or loses the database (None)."""
    from .edge import Edge
    from .proxy import standby_app

    lead.listen()
    runner = await _listen(standby_app(lead.leader, Edge(lead.leader, lead.edge_secret)), cfg)
    log.info("ComfyLB standing by on http://%s:%d: another coordinator leads; clients are passed on to it",
             cfg.server.host, cfg.server.port)
    leading = asyncio.ensure_future(lead.wait_to_lead())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([leading, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if leading.done() and leading.exception() is None:
        return runner
    if leading.done():  # its session with the database is gone: a supervisor restarts it (code 3)
        log.error("standing by: lost the database while waiting to lead (%s); stopping", leading.exception())
    await runner.cleanup()
    return None


async def _serve(cfg: Config, demo: bool) -> int:
    """Serves until SIGINT/SIGTERM (0), or until it loses the database it leads or stands by on (3)."""
    from .hosts.standalone import build_app

    loop = asyncio.get_running_loop()
    stop, lost = asyncio.Event(), asyncio.Event()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    sims = await _demo_peers(cfg) if demo else []
    lead, standby = None, None
    if cfg.storage.url:
        lead = Leadership(cfg.storage.url, cfg.server.advertised())
        if not lead.try_lead():
            standby = await _stand_by(cfg, lead, stop)
            if standby is None:
                lead.close()
                return 0 if stop.is_set() else 3
        lead.watch(lambda: loop.call_soon_threadsafe(lost.set))
    runner = await _listen(build_app(cfg), cfg)
    # What start-up made lives as long as the process: the collector need not walk it again.
    # Its full passes over it took 60-150 ms each at a few thousand relayed messages a
    # second, and held up every message meanwhile (bench/relay.py).
    gc.collect()
    gc.freeze()
    if standby is not None:
        await standby.cleanup()  # its sockets close: clients reconnect, to the leader this one now is
    log.info("ComfyLB listening on http://%s:%d with %d peer(s)", cfg.server.host, cfg.server.port,
             len(cfg.backends))
    if not is_loopback_host(cfg.server.host) and not any(configured_tokens(cfg)):
        log.warning("no token and listening on %s: OPEN to anyone who can reach it (auth.allow_open is true)",
                    cfg.server.host)
    try:
        await asyncio.wait([asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down")
    finally:
        await runner.cleanup()
        for server in sims:
            await server.stop()
        if lead is not None:
            lead.close()
    return 3 if lost.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"comfylb: config error: {e}", file=sys.stderr)
        return 2
    problem = exposure_problem(cfg)
    if problem:
        print(f"comfylb: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if cfg.server.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.demo:  # simulated runs never touch a real balancer's queue and history
        cfg.storage.dir = tempfile.mkdtemp(prefix="comfylb-demo-")
    if not cfg.backends and not args.demo:
        log.warning("no backends configured: prompts will wait until a peer is added")
    try:
        return asyncio.run(_serve(cfg, args.demo)) or 0
    except OSError as e:
        print(f"comfylb: cannot listen on {cfg.server.host}:{cfg.server.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"comfylb: state error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
