"""What each peer lacks, in the panel (issue 15, items 2 and 4), in real headless
Chromium: a "missing" badge per peer, its list on hover and on click, and for custom node
packs how to install them with ComfyUI-Manager.  On the standalone page over simulated
peers with different checkpoints, and in the coordinator ComfyUI's sidebar tab."""
from __future__ import annotations

import aiohttp
import pytest

from comfylb_ext.config import BackendConfig
from comfylb_ext.sim import catalog as sim_catalog, start_sim
from tests.client import Client
from tests.integration.test_panel import open_page, remove_peer
from tests.peers import answer, hostile_peer
from tests.simcluster import lb_over_sims, wait_for

PACK = "ComfyUI-Impact-Pack"


def packed_peer_routes() -> dict:
    """A peer with a custom node pack and a checkpoint the simulated peers also have."""
    info = {**sim_catalog([], ["a.safetensors"]),
            "SAMLoader": {"input": {"required": {}}, "output": [], "python_module": f"custom_nodes.{PACK}"}}
    return {("GET", "/object_info"): answer(info), ("GET", "/models"): answer(["checkpoints"]),
            ("GET", "/models/{folder}"): answer(["a.safetensors"])}


async def test_standalone_page_shows_what_each_peer_lacks(browser):
    async with hostile_peer(packed_peer_routes()) as (port, _):
        sim_kw = [{"checkpoints": ["a.safetensors"]}, {"checkpoints": ["b.safetensors"]}]
        async with lb_over_sims(2, sim_kw=sim_kw) as (url, sims, cluster):
            cluster.add_peer(BackendConfig(name="packed", port=port))
            await wait_for(lambda: all(p.available and p.object_info for p in cluster.peers.values()), cluster)
            page, errors = await open_page(browser, url + "/", width=460)
            try:
                panel = page.locator(".comfylb")
                badge = panel.locator('.cl-peer[data-peer="sim1"] button.cl-badge')
                await badge.wait_for(timeout=15000)
                assert "missing" in await badge.inner_text()
                title = await badge.get_attribute("title")  # the list on hover
                assert "checkpoints: a.safetensors" in title and PACK in title and "ComfyUI-Manager" in title
                missing = panel.locator('.cl-peer[data-peer="sim1"] .cl-missing')
                assert await missing.count() == 0
                await badge.click()  # the list on click
                await missing.wait_for(timeout=5000)
                text = await missing.inner_text()
                assert "checkpoints" in text and "a.safetensors" in text and "b.safetensors" not in text
                assert "custom node packs" in text and PACK in text and "SAMLoader" in text
                assert "ComfyUI-Manager" in await missing.locator(".cl-hint").inner_text()
                # the other simulated peer lacks the other checkpoint; the packed peer lacks only b
                await panel.locator('.cl-peer[data-peer="sim0"] button.cl-badge').click()
                sim0 = await panel.locator('.cl-peer[data-peer="sim0"] .cl-missing').inner_text()
                assert "b.safetensors" in sim0 and "a.safetensors" not in sim0
                await panel.locator('.cl-peer[data-peer="packed"] button.cl-badge').click()
                packed = await panel.locator('.cl-peer[data-peer="packed"] .cl-missing').inner_text()
                assert "b.safetensors" in packed and "ComfyUI-Manager" not in packed
                # pushed changes redraw the panel: an open list stays open
                async with aiohttp.ClientSession() as s:
                    async with s.post(url + "/lb/backends/sim1/disable") as r:
                        assert r.status == 200
                await panel.locator('.cl-peer[data-peer="sim1"].cl-disabled .cl-missing').wait_for(timeout=5000)
                await panel.locator('.cl-peer[data-peer="sim1"] button.cl-badge').click()
                await missing.wait_for(state="detached", timeout=5000)
                assert await badge.get_attribute("aria-expanded") == "false"
                assert errors == []
            finally:
                await page.close()


@pytest.mark.real
async def test_sidebar_tab_shows_a_checkpoint_only_one_peer_has(browser, coordinators, peers):
    """The coordinator ComfyUI with its two real peers and a simulated one that alone has
    a checkpoint: the real peers' badges list it; the simulated one lacks ComfyUI's nodes
    and the example pack the real peers have, with how to install it."""
    coord = coordinators["coord"]
    sim = await start_sim(name="only", checkpoints=["only-here.safetensors"])
    page = None
    try:
        async with Client(coord.url) as c:
            async with c.session.post(f"{coord.url}/lb/backends",
                                      json={"name": "only", "host": "127.0.0.1", "port": sim.port, "max_queue": 1}) as r:
                assert r.status == 201, await r.text()
        page, errors = await open_page(browser, coord.url)
        await page.locator(".comfylb-tab-button").click(timeout=90000)
        panel = page.locator(".comfylb")
        real = panel.locator(f'.cl-peer[data-peer="{peers[0].name}"]')
        badge = real.locator("button.cl-badge")
        await badge.wait_for(timeout=30000)
        assert "only-here.safetensors" in await badge.get_attribute("title")
        await badge.click()
        text = await real.locator(".cl-missing").inner_text()
        assert "checkpoints" in text and "only-here.safetensors" in text
        only = panel.locator('.cl-peer[data-peer="only"]')
        await only.locator("button.cl-badge").click()
        listed = await only.locator(".cl-missing").inner_text()
        assert "nodes" in listed and "in all)" in listed  # ComfyUI's many, counted beyond those shown
        assert "websocket_image_save" in listed and "ComfyUI-Manager" in listed
        assert "custom_nodes" not in listed and ".py" not in listed  # ComfyUI lists it as a model folder
        assert not [e for e in errors if "comfylb" in e.lower()], errors
    finally:
        if page is not None:
            await page.close()
        await remove_peer(coord.url, "only")
        await sim.stop()
