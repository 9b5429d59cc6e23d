"""`python -m comfylb_ext -c config.yaml [-H 127.0.0.1] [-p 8100]` — the standalone balancer."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile

from aiohttp import web

from . import __version__
from .access import configured_tokens, exposure_problem, is_loopback_host
from .config import Config, ConfigError, check_port, load
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
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = check_port("--port", args.port)
    if args.debug:
        cfg.server.debug = True
    return cfg


async def _serve(cfg: Config, demo: bool) -> None:
    from .hosts.standalone import build_app

    sims = []
    if demo:
        from .config import BackendConfig
        from .sim import start_sim

        for i in (1, 2):
            server = await start_sim(port=0, name=f"sim-{i}")
            sims.append(server)
            cfg.backends.append(BackendConfig(name=f"sim-{i}", host="127.0.0.1", port=server.port, max_queue=2))
        log.info("demo: two SIMULATED ComfyUI peers (no real ComfyUI, no GPU): %s",
                 ", ".join(b.url for b in cfg.backends[-2:]))
    runner = web.AppRunner(build_app(cfg), handle_signals=False, shutdown_timeout=SHUTDOWN_WITHIN,
                           access_log=logging.getLogger("aiohttp.access") if cfg.server.debug else None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.server.host, cfg.server.port)
    await site.start()
    log.info("ComfyLB listening on http://%s:%d with %d peer(s)", cfg.server.host, cfg.server.port,
             len(cfg.backends))
    if not is_loopback_host(cfg.server.host) and not any(configured_tokens(cfg)):
        log.warning("no token and listening on %s: OPEN to anyone who can reach it (auth.allow_open is true)",
                    cfg.server.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()
        for server in sims:
            await server.stop()


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
        asyncio.run(_serve(cfg, args.demo))
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
