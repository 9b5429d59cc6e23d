"""Comfy-Org's Comfy API v2 proxy (`comfy-api-proxy`) as a subprocess in front of a
ComfyUI URL, and what the tests need to check what its client (`comfy-sdk`) gets back."""
from __future__ import annotations

import contextlib
import struct
import sys
import zlib
from pathlib import Path
from typing import Iterator

from tests.procs import Proc, _spawn, free_port


@contextlib.contextmanager
def api_proxy(comfyui_url: str, workdir: Path, name: str = "api-proxy") -> Iterator[Proc]:
    """`comfy-api-proxy run --comfyui URL --port P`, as its README starts it, until ready."""
    proc = start_api_proxy(comfyui_url, workdir, name)
    try:
        proc.wait_ready("/api/v2/health", 30)  # answered by the proxy alone, as soon as it listens
        yield proc
    finally:
        proc.stop()


def png_colours(data: bytes) -> tuple[int, int, set[tuple[int, ...]]]:
    """(width, height, the distinct pixel values) of an 8-bit RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None, "no IHDR"
    width, height, depth, ctype, _, _, interlace = header
    assert depth == 8 and ctype in (2, 6) and interlace == 0, header
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev, off = [], bytearray(stride), 0
    for _ in range(height):
        kind, line = raw[off], bytearray(raw[off + 1:off + 1 + stride])
        off += 1 + stride
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    pixels = {tuple(row[i:i + bpp]) for row in rows for i in range(0, stride, bpp)}
    return width, height, pixels


def start_api_proxy(comfyui_url: str, workdir: Path, name: str = "api-proxy") -> Proc:
    """The same proxy, started but not waited for (from a test running an event loop that
    must keep serving meanwhile: wait_ready it in a thread)."""
    port = free_port()
    argv = [sys.executable, "-m", "comfy_api_proxy.cli", "run", "--comfyui", comfyui_url,
            "--host", "127.0.0.1", "--port", str(port)]
    return Proc(name, port, _spawn(argv, workdir / f"{name}.log", str(workdir)), workdir / f"{name}.log",
                argv=argv, cwd=str(workdir))
