"""Input files the coordinator holds (`/upload/image`, `/upload/mask`).

The coordinator keeps them and delivers each to whichever peer runs a prompt that uses
it.  Naming follows ComfyUI's `image_upload`: without `overwrite`, an existing name with
identical bytes is reused and a different file is renamed `name (1).ext`, `name (2).ext`…
The files are looked up on disk each time, so a host that writes them itself (ComfyUI's
own upload routes, in the extension) needs no bookkeeping here.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TYPES = ("input", "temp", "output")
ANNOTATIONS = {"[output]": "output", "[input]": "input", "[temp]": "temp"}


class UploadError(ValueError):
    pass


@dataclass(frozen=True)
class StoredFile:
    type: str
    subfolder: str
    filename: str
    sha256: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.type, self.subfolder, self.filename)


def split_annotation(name: str) -> tuple[str, str | None]:
    """`"a.png [output]"` → `("a.png", "output")`, as ComfyUI's annotated_filepath."""
    for suffix, typ in ANNOTATIONS.items():
        if name.endswith(suffix):
            return name[: -len(suffix) - 1], typ
    return name, None


def file_ref(value: object) -> tuple[str, str, str] | None:
    """(type, subfolder, filename) a prompt's string input names: `name.png`,
    `sub/name.png`, `name.png [output]`; None for what cannot be a file name."""
    if not isinstance(value, str) or not value or len(value) > 1024 or "\n" in value:
        return None
    name, typ = split_annotation(value)
    sub, _, base = name.replace("\\", "/").rpartition("/")
    return typ or "input", sub, base


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class InputStore:
    def __init__(self, dirs: dict[str, str | os.PathLike] | str | os.PathLike) -> None:
        if not isinstance(dirs, dict):
            dirs = {t: Path(dirs) / t for t in TYPES}
        self.dirs = {t: Path(d).resolve() for t, d in dirs.items()}
        self._digests: dict[Path, tuple[int, int, str]] = {}

    def directory(self, typ: str) -> Path:
        if typ not in self.dirs:
            raise UploadError(f"unknown type {typ!r}")
        return self.dirs[typ]

    def resolve(self, typ: str, subfolder: str, filename: str) -> Path:
        """The path for a file, refusing anything that escapes the type's directory."""
        base = self.directory(typ)
        if not filename or filename in (".", "..") or "/" in filename or "\\" in filename or "\x00" in filename:
            raise UploadError(f"bad file name {filename!r}")
        if "\x00" in subfolder or os.path.isabs(subfolder):
            raise UploadError(f"bad subfolder {subfolder!r}")
        try:
            path = (base / os.path.normpath(subfolder or ".") / filename).resolve()
        except (OSError, ValueError) as e:
            raise UploadError(f"bad path: {e}") from None
        if os.path.commonpath((str(base), str(path))) != str(base):
            raise UploadError("path escapes the upload directory")
        return path

    def _digest(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        cached = self._digests.get(path)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        try:
            digest = _sha(path.read_bytes())
        except OSError:  # a directory by that name, unreadable, …
            return None
        self._digests[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def save(self, data: bytes, filename: str, subfolder: str = "", typ: str = "input",
             overwrite: bool = False) -> StoredFile:
        path = self.resolve(typ, subfolder, filename)
        digest = _sha(data)
        if not overwrite:
            stem, ext = os.path.splitext(filename)
            i = 1
            while _exists(path):
                if self._digest(path) == digest:
                    return StoredFile(typ, subfolder, path.name, digest)
                path = path.with_name(f"{stem} ({i}){ext}")
                i += 1
        tmp = path.with_name(f".{path.name}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:  # a name too long for the file system, a full disk, …
            raise UploadError(f"cannot store {filename!r}: {e.strerror or e}") from None
        return StoredFile(typ, subfolder, path.name, digest)

    def lookup(self, typ: str, subfolder: str, filename: str) -> StoredFile | None:
        try:
            path = self.resolve(typ, subfolder, filename)
        except UploadError:
            return None
        try:
            if not path.is_file():
                return None
        except OSError:
            return None
        digest = self._digest(path)
        return StoredFile(typ, subfolder, filename, digest) if digest else None

    def digest_of(self, key: tuple[str, str, str]) -> str | None:
        f = self.lookup(*key)
        return f.sha256 if f is not None else None

    def put(self, key: tuple[str, str, str], data: bytes) -> None:
        """A file another coordinator stored, under its own name."""
        typ, subfolder, filename = key
        try:
            self.save(data, filename, subfolder, typ, overwrite=True)
        except UploadError as e:  # a name this file system refuses: that one file is missing here
            log.warning("input %s/%s/%s not stored here: %s", typ, subfolder, filename, e)

    def named(self, value: object) -> StoredFile | None:
        """The stored file a prompt's string input names, if any."""
        ref = file_ref(value)
        return self.lookup(*ref) if ref is not None else None

    def path_of(self, f: StoredFile) -> Path:
        return self.resolve(f.type, f.subfolder, f.filename)

    def references(self, prompt: dict) -> list[StoredFile]:
        """Stored files that a prompt names in any string input (LoadImage's `image`,
        `sub/name.png`, `name.png [input]` …): those must reach the peer first."""
        found: dict[tuple[str, str, str], StoredFile] = {}
        for node in prompt.values():
            inputs = node.get("inputs") if isinstance(node, dict) else None
            if not isinstance(inputs, dict):
                continue
            for value in inputs.values():
                f = self.named(value)
                if f is not None:
                    found[f.key] = f
        return list(found.values())
