"""The simulated peer must send what real ComfyUI sends (tests/data/transcript.md, recorded
from a real ComfyUI)."""
import re

import pytest

from comfylb_ext.sim import start_sim
from tests.client import Client
from tests.procs import DATA, load_workflow

TYPE = re.compile(r'WS text(?: \(trailing\))?: \{"type": "(\w+)"')


def recorded(section: str) -> list[str]:
    text = (DATA / "transcript.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return TYPE.findall(body)


@pytest.fixture
async def sim():
    server = await start_sim()
    yield server
    await server.stop()


async def test_fresh_and_cached_prompt_sequences_match_the_recording(sim):
    async with Client(f"http://127.0.0.1:{sim.port}") as c:
        prompt = load_workflow("invert.json")
        run = await c.run(prompt)
        fresh = ["status", "status"] + run.types()
        # statuses are not tied to a prompt; put the trailing one where ComfyUI sends it
        fresh.insert(len(fresh) - 1, "status")
        assert ["status"] + fresh == recorded("1. EmptyImage")
        run = await c.run(prompt)
        cached = ["status", "status"] + run.types()
        cached.insert(len(cached) - 1, "status")
        assert ["status"] + cached == recorded("2. Same prompt again")
        assert run.first("execution_cached")["nodes"] == ["1", "2", "3"]


async def test_binary_previews_follow_the_feature_flags(sim):
    async with Client(f"http://127.0.0.1:{sim.port}", flags=True) as c:
        run = await c.run(load_workflow("ws_save.json"))
        # 0.3.64 answered the first two keys only; today's ComfyUI adds the rest (api-current.md §3.1)
        assert c.feature_reply == {"supports_preview_metadata": True, "max_upload_size": 104857600,
                                   "supports_model_type_tags": True, "extension": {"manager": {"supports_v4": True}},
                                   "node_replacements": True, "assets": False}
        assert [b[:4] for b in run.binary] == [b"\x00\x00\x00\x04"] * 2
    async with Client(f"http://127.0.0.1:{sim.port}") as c:
        p = load_workflow("ws_save.json")
        p["1"]["inputs"]["color"] = 1
        run = await c.run(p)
        assert [b[:4] for b in run.binary] == [b"\x00\x00\x00\x01"] * 2
