"""What a prompt needs and what a peer has: node types and model files.  Pure.

A peer's `/object_info` lists its node types and, for combo inputs, the values it
accepts; model pickers (`ckpt_name`, `lora_name`, `vae_name`, … every input named
`*_name`) list the files it has.  A prompt may only go to a peer that has every node type
it uses and every model file it names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Model = tuple[str, str, str]  # (class_type, input name, value)


@dataclass(frozen=True)
class Requirements:
    classes: frozenset[str]
    models: frozenset[Model]
    nodes: tuple[tuple[str, str, tuple[Model, ...]], ...]  # (node id, class_type, its models): for errors
    cache_keys: frozenset[int] = field(default=frozenset(), compare=False)  # see cache_keys()

    @property
    def model_key(self) -> frozenset[str]:
        """The model files it loads: what affinity tries to keep on one peer."""
        return frozenset(v for _, _, v in self.models)


def requirements(prompt: dict) -> Requirements:
    classes: set[str] = set()
    models: set[Model] = set()
    nodes: list[tuple[str, str, tuple[Model, ...]]] = []
    for nid, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            continue
        cls = node["class_type"]
        classes.add(cls)
        mine = tuple((cls, name, value) for name, value in (node.get("inputs") or {}).items()
                     if name.endswith("_name") and isinstance(value, str))
        models.update(mine)
        nodes.append((str(nid), cls, mine))
    return Requirements(frozenset(classes), frozenset(models), tuple(nodes), cache_keys(prompt))


def cache_keys(prompt: dict) -> frozenset[int]:
    """A key per node from its class and inputs, each link replaced by the key of the node
    it comes from — as ComfyUI keys its cache: a node whose key the last prompt on a peer
    also had is served from that peer's cache instead of running again."""
    keys: dict[str, int] = {}
    entered: set[str] = set()
    for root in prompt:
        stack = [(str(root), False)]
        while stack:  # depth first without recursion: graphs can be deep
            nid, ready = stack.pop()
            node = prompt.get(nid)
            if nid in keys or not isinstance(node, dict) or (not ready and nid in entered):
                continue
            entered.add(nid)
            inputs: dict = node["inputs"] if isinstance(node.get("inputs"), dict) else {}
            links = {name: str(v[0]) for name, v in inputs.items()
                     if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt}
            if not ready:
                stack.append((nid, True))
                stack.extend((up, False) for up in links.values() if up not in keys)
                continue
            parts: tuple
            try:
                parts = tuple((name, keys.get(links[name], 0), _frozen(inputs[name][1])) if name in links
                              else (name, _frozen(inputs[name])) for name in sorted(inputs, key=str))
            except RecursionError:  # a prompt stored before input depth was bounded
                parts = ("too deep", nid)
            keys[nid] = hash((_frozen(node.get("class_type")), parts))  # a link in a cycle counts as 0
    return frozenset(keys.values())


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a JSON value: a string as it is (Python keeps a string's
    hash, so a large one costs its size once, not at every prompt that holds it), anything
    else as its JSON (1, 1.0 and true differ, as inputs)."""
    if isinstance(value, str):
        return value
    return (json.dumps(value, sort_keys=True, default=str),)


def object_info_problem(info: object) -> str | None:
    """What makes a peer's /object_info unusable (None: nothing): it must map class
    names to objects.  One peer's broken answer must not break the cluster's catalog,
    validation or scheduling: the caller ignores such an answer, and every function here
    copes with any JSON inside a class's definition."""
    if not isinstance(info, dict):
        return f"not a JSON object but {type(info).__name__}"
    bad = [cls for cls, spec in info.items() if not isinstance(spec, dict)]
    if bad:
        return f"{len(bad)} class(es) not defined by an object, e.g. {str(bad[0])[:60]!r}"
    return None


def usable_classes(info: dict) -> tuple[dict[str, dict], list[str]]:
    """(the classes of an /object_info whose definition has ComfyUI's shape — its `input`
    an object of objects (required, optional, hidden), if any — and the names of the
    others).  The cluster's catalog takes the first definition of a class a peer has, so a
    malformed one left in would stand for every peer's."""
    good, bad = {}, []
    for cls, spec in info.items():
        inputs = spec.get("input", {}) if isinstance(spec, dict) else None
        if isinstance(inputs, dict) and all(isinstance(section, dict) for section in inputs.values()):
            good[cls] = spec
        else:
            bad.append(cls)
    return good, bad


def merge_catalogs(infos: list[dict]) -> dict[str, dict]:
    """The peers' node definitions as one: a class several peers have gets the first
    definition, with every combo's values from all of them, so a model or image any
    peer has is offered (and accepted) once.  A class not defined by an object is left out."""
    merged: dict[str, dict] = {}
    for info in infos:
        if not isinstance(info, dict):
            continue
        for cls, spec in info.items():
            if not isinstance(spec, dict):
                continue
            if cls not in merged:
                merged[cls] = spec
            else:
                merged[cls] = _with_combos_of(merged[cls], spec)
    return merged


def _hashable(values: list) -> bool:
    return all(v is None or isinstance(v, (str, int, float, bool)) for v in values)


def _with_combos_of(base: dict, other: dict) -> dict:
    out = None
    ours = base.get("input")
    if not isinstance(ours, dict) or not isinstance(other.get("input"), dict):
        return base
    for category, section in ours.items():
        theirs = other["input"].get(category)
        if not isinstance(section, dict) or not isinstance(theirs, dict):
            continue
        for name, spec in section.items():
            mine, more = _combo_list(spec), _combo_list(theirs.get(name))
            if mine is None or more is None or not _hashable(mine) or not _hashable(more) or not set(more) - set(mine):
                continue
            values = mine + [v for v in more if v not in set(mine)]
            if out is None:
                out = {**base, "input": {k: dict(v) if isinstance(v, dict) else v for k, v in base["input"].items()}}
            out["input"][category][name] = ([values, *spec[1:]] if isinstance(spec[0], list)
                                            else [spec[0], {**spec[1], "options": values}, *spec[2:]])
    return out if out is not None else base


def _combo_list(spec: Any) -> list | None:
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        return list(spec[1]["options"])
    return None


def _combo(spec: Any) -> frozenset[str] | None:
    """The values of a combo input, in either of ComfyUI's spellings, else None."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return frozenset(str(v) for v in spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        return frozenset(str(v) for v in spec[1]["options"])
    return None


class Capabilities:
    """A peer's node types and model lists, from its /object_info."""

    def __init__(self, object_info: dict) -> None:
        object_info = object_info if isinstance(object_info, dict) else {}
        self.classes = frozenset(object_info)
        self.combos: dict[tuple[str, str], frozenset[str]] = {}
        for cls, info in object_info.items():
            sections = info.get("input") if isinstance(info, dict) else None
            for section in (sections.values() if isinstance(sections, dict) else ()):
                if isinstance(section, dict):
                    for name, spec in section.items():
                        values = _combo(spec) if isinstance(name, str) and name.endswith("_name") else None
                        if values is not None:
                            self.combos[(cls, name)] = values

    def lacks(self, req: Requirements) -> list[str]:
        """What this peer is missing, as words for a person ([] = it can run the prompt)."""
        out = [f"node {c}" for c in sorted(req.classes - self.classes)]
        for cls, name, value in sorted(req.models):
            values = self.combos.get((cls, name))
            if cls in self.classes and values is not None and value not in values:
                out.append(f"{name} {value!r}")
        return out

    def can_run(self, req: Requirements) -> bool:
        if not req.classes <= self.classes:
            return False
        return all(v in self.combos[(c, n)] for c, n, v in req.models if (c, n) in self.combos)


def unrunnable(req: Requirements, peers: dict[str, Capabilities]) -> tuple[dict, dict] | None:
    """ComfyUI's (error, node_errors) when no peer can run the prompt, else None."""
    if not peers or any(caps.can_run(req) for caps in peers.values()):
        return None
    node_errors: dict[str, dict] = {}
    for nid, cls, models in req.nodes:
        errors = []
        for _, name, value in models:
            have = [p for p, caps in peers.items()
                    if (cls, name) not in caps.combos or value in caps.combos[(cls, name)]]
            if not have:
                errors.append({"type": "value_not_in_list", "message": "No peer has this model",
                               "details": f"{name}: '{value}' is on none of {', '.join(sorted(peers))}",
                               "extra_info": {"input_name": name, "received_value": value}})
        if errors:
            node_errors[nid] = {"errors": errors, "dependent_outputs": [], "class_type": cls}
    lacking = "; ".join(f"{p} lacks {', '.join(caps.lacks(req))}" for p, caps in sorted(peers.items()))
    error = {"type": "prompt_outputs_failed_validation", "message": "No peer can run this prompt",
             "details": lacking, "extra_info": {}}
    return error, node_errors
