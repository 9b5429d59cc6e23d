"""Server-side node replacement, as ComfyUI applies it before validating a prompt.

A peer's `GET /node_replacements` answers `{old_class: [replacement, ...]}` where each
replacement is

    {"old_node_id": str, "new_node_id": str, "old_widget_ids": [str] | None,
     "input_mapping":  [{"new_id": str, "old_id": str} | {"new_id": str, "set_value": any}] | None,
     "output_mapping": [{"old_idx": int, "new_idx": int}] | None}

and `POST /prompt` swaps every node whose class the server lacks for the replacement's
class (when that class exists): inputs rebuilt from `input_mapping`, links from other
nodes to the old node's outputs re-pointed through `output_mapping`.

ComfyLB validates against the union of its peers' catalogs before dispatch, so it must
do the same swap or refuse prompts every peer would accept.  Pure: no I/O, stdlib only.
"""
from __future__ import annotations

import math
from collections.abc import Container, Iterable
from typing import Any

MAX_CLASSES = 10_000        # classes kept from one answer (and from a merge)
MAX_PER_CLASS = 16          # replacements kept per class
MAX_MAPPING = 256           # entries in input_mapping / output_mapping / old_widget_ids
MAX_VALUE_DEPTH = 32        # nesting allowed in a set_value

Replacement = dict[str, Any]


class _Bad(Exception):
    """A set_value that is not plain bounded JSON."""


def _json_copy(value: Any, depth: int = 0) -> Any:
    """A fresh copy of a plain JSON value; raises _Bad on anything else or too deep."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if depth >= MAX_VALUE_DEPTH:
        raise _Bad
    if isinstance(value, list):
        return [_json_copy(v, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Bad
            out[k] = _json_copy(v, depth + 1)
        return out
    raise _Bad


def _is_str(x: Any) -> bool:
    return isinstance(x, str) and x != ""


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _optional_list(raw: Any) -> list | None:
    """None/[] -> None; a list of acceptable length -> it; anything else raises _Bad."""
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_MAPPING:
        raise _Bad
    return raw or None


def _input_mapping(raw: Any) -> list[dict] | None:
    items = _optional_list(raw)
    if items is None:
        return None
    out = []
    for item in items:
        if not isinstance(item, dict) or not _is_str(item.get("new_id")):
            raise _Bad
        # ComfyUI tests "set_value" first, then "old_id"
        if "set_value" in item:
            out.append({"new_id": item["new_id"], "set_value": _json_copy(item["set_value"])})
        elif _is_str(item.get("old_id")):
            out.append({"new_id": item["new_id"], "old_id": item["old_id"]})
        else:
            raise _Bad
    return out


def _output_mapping(raw: Any) -> list[dict] | None:
    items = _optional_list(raw)
    if items is None:
        return None
    out = []
    for item in items:
        if not isinstance(item, dict) or not _is_index(item.get("old_idx")) or not _is_index(item.get("new_idx")):
            raise _Bad
        out.append({"old_idx": item["old_idx"], "new_idx": item["new_idx"]})
    return out


def _widget_ids(raw: Any) -> list[str] | None:
    # only the frontend reads these; a bad list is dropped, not the replacement
    if isinstance(raw, list) and 0 < len(raw) <= MAX_MAPPING and all(isinstance(w, str) for w in raw):
        return list(raw)
    return None


def _entry(old_class: str, raw: Any) -> Replacement | None:
    """A clean, freshly built copy of one replacement, or None when malformed."""
    if not isinstance(raw, dict):
        return None
    new_class = raw.get("new_node_id")
    if not _is_str(new_class) or new_class == old_class:
        return None
    if raw.get("old_node_id", old_class) not in (None, old_class):
        return None
    try:
        input_mapping = _input_mapping(raw.get("input_mapping"))
        output_mapping = _output_mapping(raw.get("output_mapping"))
    except (_Bad, RecursionError):
        return None
    return {"new_node_id": new_class, "old_node_id": old_class,
            "old_widget_ids": _widget_ids(raw.get("old_widget_ids")),
            "input_mapping": input_mapping, "output_mapping": output_mapping}


def parse(raw: object) -> dict[str, list[Replacement]]:
    """One peer's `/node_replacements` answer, validated and bounded; never raises.

    Malformed classes and replacements are dropped; a replacement is kept whole or not
    at all.  Keeps the first MAX_CLASSES classes and MAX_PER_CLASS replacements per
    class, one per new_node_id.
    """
    out: dict[str, list[Replacement]] = {}
    if not isinstance(raw, dict):
        return out
    for old_class, entries in raw.items():
        if len(out) >= MAX_CLASSES:
            break
        if not _is_str(old_class) or not isinstance(entries, list):
            continue
        kept: list[Replacement] = []
        seen: set[str] = set()
        for e in entries:
            if len(kept) >= MAX_PER_CLASS:
                break
            clean = _entry(old_class, e)
            if clean is not None and clean["new_node_id"] not in seen:
                seen.add(clean["new_node_id"])
                kept.append(clean)
        if kept:
            out[old_class] = kept
    return out


def merge(maps: Iterable[dict[str, list[Replacement]]]) -> dict[str, list[Replacement]]:
    """Union of parsed maps: earlier maps' entries first, each new_node_id once per class."""
    out: dict[str, list[Replacement]] = {}
    seen: dict[str, set[str]] = {}
    for m in maps:
        if not isinstance(m, dict):
            continue
        for old_class, entries in m.items():
            if not isinstance(old_class, str) or not isinstance(entries, list):
                continue
            if old_class not in out:
                if len(out) >= MAX_CLASSES:
                    continue
                out[old_class], seen[old_class] = [], set()
            kept, ids = out[old_class], seen[old_class]
            for e in entries:
                if len(kept) >= MAX_PER_CLASS:
                    break
                new_class = e.get("new_node_id") if isinstance(e, dict) else None
                if isinstance(new_class, str) and new_class not in ids:
                    ids.add(new_class)
                    kept.append(e)
    return {k: v for k, v in out.items() if v}


def _is_link(value: Any) -> bool:
    # comfy_execution.graph_utils.is_link: [str, int|float]
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)))


def _node_shape_ok(node: Any) -> bool:
    # ComfyUI skips entries without class_type/inputs; a non-dict `inputs` (which would
    # crash ComfyUI) is left alone too, for validation to refuse.
    return isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs"), dict)


def _choose(class_type: Any, replacements: dict, known: Container[str]) -> Replacement | None:
    if not isinstance(class_type, str) or class_type in known:
        return None
    candidates = replacements.get(class_type)
    if not isinstance(candidates, list):
        return None
    for raw in candidates[:MAX_PER_CLASS]:
        # re-checked (cheap) so a hand-built map cannot make apply raise; also gives
        # every replaced node its own copy of each set_value
        e = _entry(class_type, raw)
        if e is not None and e["new_node_id"] in known:
            return e
    return None


def apply(prompt: dict, replacements: dict[str, list[Replacement]], known: Container[str]) -> dict:
    """A new prompt with replaced classes swapped in, as ComfyUI's POST /prompt does.

    A node is replaced when its class is not in `known` and one of its replacements
    names a class that is (the first such, in map order).  The input prompt is never
    modified; unchanged nodes are shared with it.  Differences from ComfyUI, which
    would raise or depend on set order: an `old_id` naming an input the node lacks
    leaves that input out; links are re-pointed by their original (source, index) so a
    replaced node consuming from another replaced node gets the re-mapped index.
    """
    if not isinstance(prompt, dict):
        return prompt
    out = dict(prompt)
    if not isinstance(replacements, dict) or not replacements:
        return out

    chosen: dict[Any, Replacement] = {}
    for node_id, node in prompt.items():
        if _node_shape_ok(node):
            r = _choose(node["class_type"], replacements, known)
            if r is not None:
                chosen[node_id] = r
    if not chosen:
        return out

    # (source node id, old output index) -> new index, last mapping entry winning as in ComfyUI
    remap: dict[str, dict[Any, int]] = {}
    for node_id, r in chosen.items():
        if isinstance(node_id, str) and r["output_mapping"]:
            remap[node_id] = {m["old_idx"]: m["new_idx"] for m in r["output_mapping"]}

    def relink(value: Any) -> tuple[Any, bool]:
        if _is_link(value) and value[0] in remap:
            idx = value[1]
            if not (isinstance(idx, float) and math.isnan(idx)):
                table = remap[value[0]]
                if idx in table:
                    return [value[0], table[idx]], True
        return value, False

    for node_id, node in prompt.items():
        if not _node_shape_ok(node):
            continue
        r = chosen.get(node_id)
        if r is not None:
            old_inputs = node["inputs"]
            inputs: dict[str, Any] = {}
            for m in r["input_mapping"] or ():
                if "set_value" in m:
                    inputs[m["new_id"]] = m["set_value"]
                elif m["old_id"] in old_inputs:
                    value, moved = relink(old_inputs[m["old_id"]])
                    inputs[m["new_id"]] = value if moved or not _is_link(value) else list(value)
            new_node = dict(node)
            new_node["class_type"] = r["new_node_id"]
            new_node["inputs"] = inputs
            if isinstance(node.get("_meta"), dict):
                new_node["_meta"] = dict(node["_meta"])
            out[node_id] = new_node
        elif remap:
            changed: dict[str, Any] = {}
            for name, value in node["inputs"].items():
                value, moved = relink(value)
                if moved:
                    changed[name] = value
            if changed:
                out[node_id] = {**node, "inputs": {**node["inputs"], **changed}}
    return out
