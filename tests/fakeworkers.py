"""Local workers over a stand-in ComfyUI: a folder whose main.py runs a simulated peer on the
port and output folder ComfyLB gives it, so the supervisor, its routes and the pages showing
workers are tested in seconds (tests/integration/test_workers.py runs real ComfyUI)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, AsyncIterator

from tests.procs import REPO, free_ports
from tests.simcluster import start_balancer, wait_for

FAKE_MAIN = """import sys
sys.path.insert(0, {repo!r})
args = sys.argv[1:]
print("stand-in ComfyUI", " ".join(args), flush=True)
sys.argv = ["sim", "--port", args[args.index("--port") + 1], "--name", "fake",
            "--dir", args[args.index("--output-directory") + 1]]
from comfylb_ext.sim import main
main()
"""


def fake_comfyui(folder: Path) -> Path:
    """`folder` made a stand-in ComfyUI folder (its main.py, a comfy/ beside it)."""
    (folder / "comfy").mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(FAKE_MAIN.format(repo=str(REPO)))
    return folder


@contextlib.asynccontextmanager
async def lb_over_fake_workers(tmp_path: Path, count: int = 1, **sections: Any) -> AsyncIterator[tuple[str, Any]]:
    """The standalone balancer in this process with `count` local workers running the
    stand-in ComfyUI from `tmp_path`, once every worker is available: (url, cluster)."""
    workers = {"count": count, "base_port": free_ports(count), "comfyui": str(fake_comfyui(tmp_path)),
               "python": sys.executable}
    runner, cluster, url = await start_balancer([], str(tmp_path / "lb"), workers=workers, **sections)
    try:
        names = {f"worker-{i}" for i in range(count)}
        await wait_for(lambda: names <= {n for n, p in cluster.peers.items() if p.available}, cluster, timeout=30)
        yield url, cluster
    finally:
        await runner.cleanup()
