"""Files uploaded to the coordinator (`/upload/image`, `/upload/mask`).

The coordinator keeps them and delivers each to whichever peer runs a prompt that uses
it.  Naming follows ComfyUI's `image_upload`: without `overwrite`, an existing name with
identical bytes is reused and a different file is renamed `name (1).ext`, `name (2).ext`…
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

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


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class InputStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self._index: dict[tuple[str, str, str], StoredFile] = {}
        self._scan()

    def _scan(self) -> None:
        for typ in TYPES:
            base = self.root / typ
            if not base.is_dir():
                continue
            for path in base.rglob("*"):
                if path.is_file():
                    rel = path.relative_to(base)
                    sub = rel.parent.as_posix() if rel.parent != Path(".") else ""
                    self._index[(typ, sub, path.name)] = StoredFile(typ, sub, path.name, _sha(path.read_bytes()))

    def directory(self, typ: str) -> Path:
        if typ not in TYPES:
            raise UploadError(f"unknown type {typ!r}")
        return self.root / typ

    def resolve(self, typ: str, subfolder: str, filename: str) -> Path:
        """The path for a file, refusing anything that escapes the type's directory."""
        base = self.directory(typ)
        if not filename or filename in (".", "..") or "/" in filename or "\\" in filename or "\x00" in filename:
            raise UploadError(f"bad file name {filename!r}")
        if "\x00" in subfolder or os.path.isabs(subfolder):
            raise UploadError(f"bad subfolder {subfolder!r}")
        path = (base / os.path.normpath(subfolder or ".") / filename).resolve()
        if os.path.commonpath((str(base.resolve()), str(path))) != str(base.resolve()):
            raise UploadError("path escapes the upload directory")
        return path

    def save(self, data: bytes, filename: str, subfolder: str = "", typ: str = "input",
             overwrite: bool = False) -> StoredFile:
        path = self.resolve(typ, subfolder, filename)
        digest = _sha(data)
        if not overwrite:
            stem, ext = os.path.splitext(filename)
            i = 1
            while path.exists():
                if _sha(path.read_bytes()) == digest:
                    return self._remember(typ, subfolder, path.name, digest)
                path = path.with_name(f"{stem} ({i}){ext}")
                i += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return self._remember(typ, subfolder, path.name, digest)

    def _remember(self, typ: str, subfolder: str, name: str, digest: str) -> StoredFile:
        f = StoredFile(typ, subfolder, name, digest)
        self._index[f.key] = f
        return f

    def lookup(self, typ: str, subfolder: str, filename: str) -> StoredFile | None:
        return self._index.get((typ, subfolder, filename))

    def path_of(self, f: StoredFile) -> Path:
        return self.resolve(f.type, f.subfolder, f.filename)

    def references(self, prompt: dict) -> list[StoredFile]:
        """Stored files that a prompt names in any string input (LoadImage's `image`,
        `sub/name.png`, `name.png [input]` …): those must reach the peer first."""
        found: dict[tuple[str, str, str], StoredFile] = {}
        if not self._index:
            return []
        for node in prompt.values():
            inputs = node.get("inputs") if isinstance(node, dict) else None
            if not isinstance(inputs, dict):
                continue
            for value in inputs.values():
                if not isinstance(value, str) or not value:
                    continue
                name, typ = split_annotation(value)
                sub, _, base = name.replace("\\", "/").rpartition("/")
                f = self._index.get((typ or "input", sub, base))
                if f is not None:
                    found[f.key] = f
        return list(found.values())
