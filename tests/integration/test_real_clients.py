"""Clients nobody here wrote, through ComfyLB over real ComfyUI peers: Comfy-Org's Comfy API
v2 proxy (`comfy-api-proxy`, PyPI) pointed at ComfyLB as at one ComfyUI, driven by Comfy-Org's
Python SDK (`comfy-sdk`, PyPI): submit, wait, outputs, cancel.

The proxy reaches its ComfyUI with POST /prompt (its job id as prompt_id and client_id),
GET /history/{id} then GET /queue for a job's state, GET /view for an output's bytes,
POST /api/jobs/{id}/cancel, and /ws?clientId={job id} for a job's live events."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from urllib.parse import quote, urlencode

import pytest
from comfy_sdk import AsyncComfy, Comfy, Progress, StatusChange

from tests.api_proxy import api_proxy, png_colours
from tests.client import invert_prompt, sleep_prompt

pytestmark = pytest.mark.real

TERMINAL = {"succeeded", "failed", "canceled", "expired"}  # comfy-sdk's terminal states


@pytest.fixture(scope="module", params=["balancer", "coord"])
def lb(request):
    """ComfyLB standalone over two real peers, or inside a real coordinator ComfyUI over them."""
    if request.param == "balancer":
        return request.getfixturevalue("balancer")
    return request.getfixturevalue("coordinators")["coord"]


@pytest.fixture(scope="module")
def v2(lb, workdir):
    """comfy-api-proxy, started as its README starts it, with ComfyLB as its ComfyUI."""
    with api_proxy(lb.url, workdir, f"api-proxy-{lb.name}") as proxy:
        yield proxy


@pytest.fixture
def v2_env(v2, monkeypatch):
    """comfy-sdk finds a self-hosted deployment by COMFY_BASE_URL only; it needs no key there."""
    monkeypatch.setenv("COMFY_BASE_URL", v2.url)
    monkeypatch.delenv("COMFY_API_KEY", raising=False)
    return v2


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def history_entry(base: str, prompt_id: str) -> dict | None:
    status, body = get(f"{base}/history/{quote(prompt_id)}")
    assert status == 200, (base, status, body[:200])
    return json.loads(body).get(prompt_id)


def ran_on(peers, prompt_id: str) -> list:
    """The peers whose own history holds the prompt (no ComfyLB code involved)."""
    return [p for p in peers if history_entry(p.url, prompt_id) is not None]


def inverted(colour: int) -> tuple[int, int, int]:
    return tuple(255 - (colour >> shift & 255) for shift in (16, 8, 0))


def test_quick_jobs_complete_with_the_images_comfylb_serves(lb, peers, v2_env):
    prompts = [invert_prompt("v2sdk") for _ in range(4)]
    with Comfy(timeout=60) as sdk:
        jobs = [sdk.submit(sdk.workflows.from_json(p)) for p in prompts]
        assert len({j.id for j in jobs}) == 4
        for job, prompt in zip(jobs, prompts):
            job.wait(timeout=120)
            assert job.status == "succeeded", (job.status, job.error, lb.tail())
            assert job.error is None
            (out,) = job.outputs
            assert (out.node_id, out.type, out.content_type, out.job_id) == ("3", "image", "image/png", job.id)
            got = out.to_bytes()

            # what ComfyLB says the job wrote, and serves under that name
            entry = history_entry(lb.url, job.id)
            assert entry is not None and entry["status"]["status_str"] == "success"
            (image,) = entry["outputs"]["3"]["images"]
            assert out.name == image["filename"]
            params = urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
            status, via_lb = get(f"{lb.url}/view?{params}")
            assert status == 200 and got == via_lb

            # the very file the peer that ran it wrote
            (peer,) = ran_on(peers[:2], job.id)
            status, on_peer = get(f"{peer.url}/view?{params}")
            assert status == 200 and got == on_peer

            # and it is this job's image: its own random colour, inverted
            width, height, colours = png_colours(got)
            assert (width, height) == (16, 16)
            (colour,) = colours
            want = inverted(prompt["1"]["inputs"]["color"])
            assert all(abs(a - b) <= 1 for a, b in zip(colour, want)), (colour, want)


async def running(job, timeout: float) -> None:
    """Until the job's live events (the SDK's SSE stream) show it running."""
    async def watch() -> None:
        events = job.events()
        try:
            async for ev in events:
                if isinstance(ev, Progress) or (isinstance(ev, StatusChange) and ev.status == "running"):
                    return
                assert not (isinstance(ev, StatusChange) and ev.status in TERMINAL), ev
        finally:
            await events.aclose()
        pytest.fail("the event stream ended before the job ran")
    await asyncio.wait_for(watch(), timeout)


async def test_a_long_job_cancelled_through_the_sdk_is_interrupted_on_its_peer(lb, peers, v2_env):
    async with AsyncComfy(timeout=60) as sdk:
        job = await sdk.submit(sdk.workflows.from_json(sleep_prompt(30, "v2cancel")))
        submitted = time.monotonic()
        await running(job, 120)
        await job.cancel()
        # The proxy reads the job's state right after asking ComfyLB to cancel it: "canceling"
        # until the interrupt lands at the node's next check, then "canceled" — never
        # "expired", even when it lands between the proxy's two reads (polls.py).
        assert job.status in ("canceling", "canceled"), job.status
        await job.wait(timeout=60)
        assert job.status == "canceled", (job.status, job.error)
        assert time.monotonic() - submitted < 30  # it did not sleep its 30 s out
        assert job.outputs == []

    (peer,) = ran_on(peers[:2], job.id)
    entry = history_entry(peer.url, job.id)
    events = [m[0] for m in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in events, events
    assert "execution_success" not in events and entry["outputs"] == {}
    # ComfyLB's own word on it, in today's ComfyUI's jobs API
    status, body = get(f"{lb.url}/api/jobs/{job.id}")
    assert status == 200 and json.loads(body)["status"] == "cancelled", body[:300]
