"""The standalone program as a user runs it: --demo works at once, signals stop it cleanly."""
import asyncio
import signal
import subprocess
import sys

import pytest

from tests.client import Client, invert_prompt
from tests.procs import REPO, Proc, free_port


@pytest.fixture
def demo(tmp_path):
    port = free_port()
    log = tmp_path / "demo.log"
    popen = subprocess.Popen([sys.executable, "-m", "comfylb_ext", "--demo", "-H", "127.0.0.1", "-p", str(port)],
                             cwd=tmp_path, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    proc = Proc("demo", port, popen, log, cwd=str(REPO))
    yield proc
    proc.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_demo_runs_a_prompt_and_stops_cleanly_on_signal(demo, sig):
    await asyncio.to_thread(demo.wait_ready, "/system_stats", 30)
    assert "SIMULATED" in demo.log.read_text()
    async with Client(demo.url) as c:
        _, now = await c.get("/lb/status")
        if not all(b["available"] for b in now["backends"]):  # else the next push says so
            await c.wait_event("comfylb.status", lambda d: all(b["available"] for b in d["backends"]), 30)
        run = await c.run(invert_prompt())
        assert "execution_success" in run.types()
    demo.signal(sig)
    assert await asyncio.to_thread(demo.popen.wait, 15) == 0
    assert "shutting down" in demo.log.read_text()
    assert "Traceback" not in demo.log.read_text()
