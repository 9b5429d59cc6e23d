"""Hostile prompts against real ComfyUI peers: a `filename_prefix` cannot make one peer
write or report a file in another peer's folder, and forwarded routes reach only the
route they name.  (Hostile *peers* are written in tests/unit/test_hostile_peers.py.)"""
from __future__ import annotations

import aiohttp
import pytest
from yarl import URL

from tests.client import Client, sleep_prompt

pytestmark = pytest.mark.real


def on(prompt: dict, peer: str) -> dict:
    return {**prompt, "99": {"class_type": "ComfyLBRoute", "inputs": {"target": peer}}}


@pytest.mark.parametrize("prefix", ["../{victim}/victim", "a/../../{victim}/victim", "{attacker}/../{victim}/victim",
                                    "/{victim}/victim", "%2e%2e/{victim}/victim"])
async def test_a_prompt_cannot_write_or_claim_a_file_in_another_peers_folder(balancer, peers, prefix):
    victim, attacker = peers[0].name, peers[1].name
    async with Client(balancer.url) as c:
        run = await c.run(on(sleep_prompt(0, prefix="victim"), victim))
        image = run.first("executed")["output"]["images"][0]
        assert image["subfolder"] == victim
        status, before = await c.get("/view", params=image)
        assert status == 200
        run = await c.run(on(sleep_prompt(0, prefix=prefix.format(victim=victim, attacker=attacker)), attacker))
        assert "execution_success" in run.types(), run.messages
        theirs = run.first("executed")["output"]["images"][0]
        assert theirs["subfolder"].split("/")[0] == attacker, theirs
        status, after = await c.get("/view", params=image)
        assert status == 200 and after == before
        async with aiohttp.ClientSession() as s:  # nothing landed in the victim's folder on the attacker
            async with s.get(peers[1].url + "/view", params=image) as r:
                assert r.status == 404


async def test_forwarded_routes_never_resolve_into_another_route(balancer, peers):
    async with aiohttp.ClientSession() as s:
        for path in ("/api/userdata/../../prompt", "/api/userdata/%2e%2e/%2e%2e/prompt",
                     "/api/userdata/..%2f..%2fprompt", "/settings/..%2F..%2Finterrupt"):
            async with s.get(URL(balancer.url + path, encoded=True)) as r:
                assert r.status == 400, (path, r.status)
        # a file name with an encoded slash, as the web UI writes it, still reaches /userdata/{file}
        async with s.post(URL(balancer.url + "/api/userdata/workflows%2Fhostile%20test.json?overwrite=true",
                              encoded=True), data=b'{"nodes": []}') as r:
            assert r.status == 200, await r.text()
        async with s.get(URL(balancer.url + "/api/userdata/workflows%2Fhostile%20test.json", encoded=True)) as r:
            assert r.status == 200 and await r.json() == {"nodes": []}
