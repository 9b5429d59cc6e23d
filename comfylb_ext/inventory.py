"""What each peer has — model files per folder, node types, custom node packs — and what
each lacks against the union of all peers.  Pure: plain data in, plain data out.

Peers are not trusted: whatever a peer answers (a dict where a list belongs, numbers for
names, a million files) yields less from that peer, never an exception, and never more
than the caps below, so one odd peer cannot break the inventory of the others.

Custom node packs are named as ComfyUI names them: a node from a pack carries
`python_module` "custom_nodes.<pack folder>[.submodule…]" in /object_info (core nodes say
"nodes", ComfyUI's extras "comfy_extras.…").  ComfyLB only names missing packs;
installing them is ComfyUI-Manager's work.
"""
from __future__ import annotations

import re
from typing import Any

MAX_NAME = 512          # characters in a node, pack or file name
MAX_FOLDERS = 128       # model folders per peer (ComfyUI has ~25, custom nodes add a few)
MAX_FILES = 20_000      # files per model folder
MAX_NODES = 50_000      # node types per peer (a large install has ~5,000)
MAX_PACKS = 2_000       # custom node packs per peer
MAX_LISTED = 500        # names per list in what a peer lacks; the counts stay exact
HINT_PACKS = 10         # packs named in the one-line install hint
PACK_PREFIX = "custom_nodes."
# a folder name goes into a peer's path (/models/{folder}): ComfyUI's are identifiers
_FOLDER = re.compile(r"[\w][\w .\-]{0,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# folders ComfyUI's /models lists that hold no models (its own /experiment/models leaves them out)
NOT_MODELS = frozenset({"custom_nodes", "configs"})

Inventory = dict[str, Any]


def _name(value: Any) -> str | None:
    """A name a peer sent, if it is one: a short string without control characters."""
    if isinstance(value, str) and 0 < len(value) <= MAX_NAME and not _CONTROL.search(value):
        return value
    return None


def names(values: Any, cap: int) -> tuple[list[str], bool]:
    """(the distinct names in a peer's list, or a map's keys, sorted, at most `cap`; whether
    any were cut).  Anything else counts as empty; entries that are not names are skipped."""
    if not isinstance(values, (list, dict)):
        return [], False
    found: set[str] = set()
    for value in values:
        name = _name(value)
        if name is not None:
            found.add(name)
            if len(found) > cap:
                break
    return sorted(found)[:cap], len(found) > cap


def folder_names(answer: Any) -> list[str] | None:
    """The model folders of a peer's GET /models (a list of names in ComfyUI), those safe to
    ask for by name and holding models; None when the answer is not a list."""
    if not isinstance(answer, list):
        return None
    folders = sorted({f for f in answer if isinstance(f, str) and _FOLDER.fullmatch(f) and f not in NOT_MODELS})
    return folders[:MAX_FOLDERS]


def pack_of(python_module: Any) -> str | None:
    """The custom node pack a node comes from ("custom_nodes.ComfyUI-Impact-Pack.modules.x"
    → "ComfyUI-Impact-Pack"); None for ComfyUI's own nodes."""
    if not isinstance(python_module, str) or not python_module.startswith(PACK_PREFIX):
        return None
    return _name(python_module[len(PACK_PREFIX):].split(".", 1)[0])


def inventory(object_info: Any, listings: dict[str, Any] | None) -> Inventory:
    """A peer's inventory from its /object_info (None: not known yet) and its model
    listings ({folder: its /models/{folder} answer, or None where that could not be read};
    None: /models did not answer).

    {"models": {folder: [files]} | None, "nodes": [...] | None, "packs": [...] | None,
     "unlisted": [folders it has but whose files could not be read], "truncated": [...]}"""
    truncated: list[str] = []
    nodes: list[str] | None = None
    packs: list[str] | None = None
    if isinstance(object_info, dict):
        nodes, cut = names(object_info, MAX_NODES)
        if cut:
            truncated.append("nodes")
        found = {pack_of(spec.get("python_module")) for spec in object_info.values() if isinstance(spec, dict)}
        packs, cut = names([p for p in found if p], MAX_PACKS)
        if cut:
            truncated.append("packs")
    models: dict[str, list[str]] | None = None
    unlisted: list[str] = []
    if isinstance(listings, dict):
        models = {}
        for folder in folder_names(list(listings)) or []:
            answer = listings[folder]
            if not isinstance(answer, list):
                unlisted.append(folder)
                continue
            models[folder], cut = names(answer, MAX_FILES)
            if cut:
                truncated.append(f"models/{folder}")
    return {"models": models, "nodes": nodes, "packs": packs, "unlisted": unlisted, "truncated": truncated}


def _set(value: Any) -> set[str] | None:
    return {v for v in value if isinstance(v, str)} if isinstance(value, list) else None


def _known(inv: Any) -> Inventory:
    """An inventory as lacks() reads it: any part that is not the right shape is unknown."""
    inv = inv if isinstance(inv, dict) else {}
    models = inv.get("models")
    return {"models": ({f: _set(v) or set() for f, v in models.items() if isinstance(f, str) and isinstance(v, list)}
                       if isinstance(models, dict) else None),
            "nodes": _set(inv.get("nodes")), "packs": _set(inv.get("packs")),
            "unlisted": _set(inv.get("unlisted")) or set()}


def lacks(inventories: dict[str, Any]) -> dict[str, dict]:
    """For each peer, what it lacks that another peer has:
    {peer: {"lacks": {"models": {folder: [files]}, "nodes": [...], "packs": [...]},
            "missing": {"models": n, "nodes": n, "packs": n}, "unknown": [...]}}.
    Lists hold at most MAX_LISTED names each (the models' at most that many in all);
    `missing` counts them all.  What a peer could not tell (no /object_info yet, no
    /models, a folder it could not list) is in `unknown` and not counted as lacking."""
    known = {name: _known(inv) for name, inv in inventories.items()}
    union_models: dict[str, set[str]] = {}
    union: dict[str, set[str]] = {"nodes": set(), "packs": set()}
    for inv in known.values():
        for folder, files in (inv["models"] or {}).items():
            union_models.setdefault(folder, set()).update(files)
        for key in union:
            union[key] |= inv[key] or set()
    return {name: _peer_lacks(inv, union_models, union) for name, inv in known.items()}


def _peer_lacks(inv: Inventory, union_models: dict[str, set[str]], union: dict[str, set[str]]) -> dict:
    unknown = [key for key in ("models", "nodes", "packs") if inv[key] is None]
    unknown += [f"models/{f}" for f in sorted(inv["unlisted"])]
    out: dict[str, Any] = {"models": {}}
    missing = {"models": 0}
    budget = MAX_LISTED
    if inv["models"] is not None:
        for folder in sorted(union_models):
            if folder in inv["unlisted"]:
                continue
            gone = sorted(union_models[folder] - inv["models"].get(folder, set()))
            missing["models"] += len(gone)
            if gone and budget > 0:
                out["models"][folder] = gone[:budget]
                budget -= len(out["models"][folder])
    for key in ("nodes", "packs"):
        gone = sorted(union[key] - inv[key]) if inv[key] is not None else []
        out[key], missing[key] = gone[:MAX_LISTED], len(gone)
    return {"lacks": out, "missing": missing, "unknown": unknown}


def packs_hint(peer: str, packs: list[str]) -> str | None:
    """How to get a peer the custom node packs it lacks: ComfyLB installs no code."""
    if not packs:
        return None
    named = ", ".join(packs[:HINT_PACKS]) + (f" (and {len(packs) - HINT_PACKS} more)" if len(packs) > HINT_PACKS else "")
    return (f"install with ComfyUI-Manager on {peer}: Manager → Custom Nodes Manager, search for "
            f"{named}, install, then restart that ComfyUI")
