"""Real ComfyUI peers that run ComfyLB as their agent (role: peer, a shared
auth.agent_secret), holding model files made up for the test: the model-copy tests'
shared parts (test_models.py, test_sidebar_copies.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from tests import procs

SECRET = "test-agent-secret-0123456789"
PROBE = Path(__file__).resolve().parent / "data" / "custom_nodes" / "comfylb_probe"
STARTUP = 180


def model_bytes(tag: str, size: int = 3 << 20) -> bytes:
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def agent_peer(comfy_env: dict, workdir: Path, name: str, models: dict[str, bytes]) -> procs.Proc:
    """A real ComfyUI with ComfyLB in its custom_nodes as the agent, holding `models` in
    its models/checkpoints."""
    checkpoints = workdir / name / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for file, data in models.items():
        (checkpoints / file).write_bytes(data)
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"role": "peer", "auth": {"agent_secret": SECRET}}))
    return procs.start_comfyui(comfy_env, name, workdir, custom_nodes={"comfylb": procs.REPO, "comfylb_probe": PROBE},
                               environ={"COMFYLB_CONFIG": str(config)})
