"""Comfy-Org's Comfy API v2 proxy (`comfy-api-proxy`, a subprocess) in front of the balancer
over simulated peers (as `--demo` runs it: jobs of milliseconds), driven by `comfy-sdk`:
quick jobs submitted, waited for, and their images read back (the real-peer version is
tests/integration/test_real_clients.py)."""
from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlencode

import aiohttp
from comfy_sdk import AsyncComfy

from comfylb_ext.api.comfy import ComfyApi
from comfylb_ext.sim import png
from tests.api_proxy import start_api_proxy
from tests.client import invert_prompt, sleep_prompt
from tests.simcluster import lb_over_sims, wait_for


@contextlib.asynccontextmanager
async def sdk_through_proxy(url: str, tmp_path, monkeypatch):
    """comfy-sdk, pointed at comfy-api-proxy (a subprocess) in front of the balancer at url."""
    proxy = start_api_proxy(url, tmp_path)
    try:
        # this loop serves the balancer meanwhile: wait for the proxy off it
        await asyncio.to_thread(proxy.wait_ready, "/api/v2/health", 30)
        monkeypatch.setenv("COMFY_BASE_URL", proxy.url)
        monkeypatch.delenv("COMFY_API_KEY", raising=False)
        async with AsyncComfy(timeout=30) as sdk:
            yield sdk
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_quick_jobs_through_the_v2_proxy_complete_with_their_own_images(monkeypatch, tmp_path):
    async with lb_over_sims(2) as (url, sims, cluster):
        async with sdk_through_proxy(url, tmp_path, monkeypatch) as sdk, aiohttp.ClientSession() as http:
            jobs = [await sdk.submit(sdk.workflows.from_json(invert_prompt("v2sim"))) for _ in range(4)]
            assert len({j.id for j in jobs}) == 4
            await asyncio.gather(*(j.wait(timeout=30) for j in jobs))
            for job in jobs:
                assert job.status == "succeeded", (job.status, job.error)
                (out,) = job.outputs
                assert (out.node_id, out.type, out.job_id) == ("3", "image", job.id)
                got = await out.to_bytes()
                # a simulated peer draws each job's image in a colour of its own prompt id
                assert got == png(8, 8, hash(job.id) & 0xFFFFFF)

                async with http.get(f"{url}/history/{job.id}") as r:
                    (image,) = (await r.json())[job.id]["outputs"]["3"]["images"]
                assert out.name == image["filename"]
                params = urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                async with http.get(f"{url}/view?{params}") as r:
                    assert r.status == 200 and await r.read() == got
                (ran,) = [s for s in sims if job.id in s.sim.history]
                async with http.get(f"http://127.0.0.1:{ran.port}/view?{params}") as r:
                    assert r.status == 200 and await r.read() == got


async def test_a_job_that_ends_between_the_proxys_two_reads_is_never_called_expired(monkeypatch, tmp_path):
    """comfy-api-proxy 0.1.6 finds a job's state by GET /history/{id} and then GET /queue, and
    calls a job in neither "expired" (terminal for comfy-sdk); on a single ComfyUI a job that
    ends between the two reads is in neither.  Here /queue answers only once the job has
    ended, as a slow answer would: the job whose history was just asked for is still listed
    as running (polls.py), and the proxy's next read finds it succeeded."""
    original = ComfyApi.get_queue

    async def late_queue(self, request):
        await wait_for(lambda: not self.cluster.tasks, self.cluster)
        return await original(self, request)
    monkeypatch.setattr(ComfyApi, "get_queue", late_queue)
    async with lb_over_sims(1) as (url, sims, cluster):
        async with sdk_through_proxy(url, tmp_path, monkeypatch) as sdk:
            job = await sdk.submit(sdk.workflows.from_json(sleep_prompt(0.5, "v2race")))
            await job.wait(timeout=30)  # its first read comes while the job sleeps
            assert job.status == "succeeded", job.status
            assert [o.node_id for o in job.outputs] == ["3"]
        assert not cluster.polls.lingering()  # seen to end: listed no more
