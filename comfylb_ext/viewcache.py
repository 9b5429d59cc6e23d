"""Output images the coordinator has already relayed, kept on its disk.

A peer's outputs never change once written (ComfyUI numbers new files, and every peer
writes into its own subfolder), so the second `/view` of a file is served from here with
sendfile — as fast as ComfyUI serving its own file — and still works after its peer is
gone.  A file name produced again (a peer whose output folder was emptied starts its
numbering over) drops the old copy.  Bounded: the oldest copies go first.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class ViewCache:
    def __init__(self, root: str | os.PathLike | None, limit_bytes: int) -> None:
        self.root = Path(root).resolve() if root and limit_bytes > 0 else None
        self.limit = limit_bytes
        self.sizes: dict[Path, int] = {}
        if self.root is not None and self.root.is_dir():
            files = sorted((p for p in self.root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
            self.sizes = {p: p.stat().st_size for p in files}  # insertion order = oldest first
        self.total = sum(self.sizes.values())
        self._lock = threading.Lock()  # put() runs in a worker thread

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _path(self, subfolder: str, filename: str) -> Path | None:
        if self.root is None:
            return None
        try:
            path = (self.root / os.path.normpath(subfolder or ".") / filename).resolve()
        except (OSError, ValueError):  # a NUL byte, a name too long, …
            return None
        return path if path.parent == self.root or self.root in path.parents else None

    def get(self, subfolder: str, filename: str) -> Path | None:
        path = self._path(subfolder, filename)
        return path if path is not None and path in self.sizes and path.is_file() else None

    def put(self, subfolder: str, filename: str, body: bytes) -> None:
        path = self._path(subfolder, filename)
        if path is None or len(body) > self.limit:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part")
            tmp.write_bytes(body)
            os.replace(tmp, path)
        except OSError as e:
            log.debug("not cached %s: %s", path, e)
            return
        with self._lock:
            self.total += len(body) - self.sizes.pop(path, 0)
            self.sizes[path] = len(body)
            while self.total > self.limit and self.sizes:
                self.drop(next(iter(self.sizes)))

    def invalidate(self, subfolder: str, filename: str) -> None:
        path = self._path(subfolder, filename)
        if path is not None and path in self.sizes:
            with self._lock:
                self.drop(path)

    def drop(self, path: Path) -> None:
        """Forget and delete a copy (the caller holds the lock)."""
        self.total -= self.sizes.pop(path, 0)
        try:
            path.unlink()
        except OSError:
            pass
