"""ComfyUI's own example API scripts (from the ComfyUI tree obtained at run time), pointed
at the balancer: clients written without any knowledge of ComfyLB."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.client import invert_prompt
from tests.procs import load_workflow

pytestmark = pytest.mark.real


def example(comfy_env, name: str, server: str) -> dict:
    """The example's functions, without its module-level demo (which wants a checkpoint)."""
    source = (Path(comfy_env["tree"]) / "script_examples" / name).read_text()
    source = source.split("\nprompt_text = ", 1)[0]
    ns: dict = {"__name__": "comfyui_example"}
    exec(compile(source, name, "exec"), ns)
    ns["server_address"] = server
    return ns


def run_example(ns: dict, prompt: dict) -> dict:
    import websocket

    ws = websocket.WebSocket()
    ws.connect(f"ws://{ns['server_address']}/ws?clientId={ns['client_id']}")
    try:
        return ns["get_images"](ws, prompt)
    finally:
        ws.close()


async def test_websockets_api_example(balancer, comfy_env):
    ns = example(comfy_env, "websockets_api_example.py", f"127.0.0.1:{balancer.port}")
    images = await asyncio.to_thread(run_example, ns, invert_prompt("example"))
    assert list(images) == ["3"] and images["3"][0][:8] == b"\x89PNG\r\n\x1a\n"


async def test_websockets_api_example_ws_images(balancer, comfy_env):
    ns = example(comfy_env, "websockets_api_example_ws_images.py", f"127.0.0.1:{balancer.port}")
    prompt = load_workflow("ws_save.json")
    prompt["1"]["inputs"]["color"] = random.randrange(1 << 24)
    prompt["save_image_websocket_node"] = prompt.pop("3")
    images = await asyncio.to_thread(run_example, ns, prompt)
    frames = images["save_image_websocket_node"]
    assert len(frames) == 2 and all(f[:8] == b"\x89PNG\r\n\x1a\n" for f in frames)
