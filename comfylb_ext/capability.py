"""What a prompt needs and what a peer has: node types and model files.  Pure.

A peer's `/object_info` lists its node types and, for combo inputs, the values it
accepts; model pickers (`ckpt_name`, `lora_name`, `vae_name`, … every input named
`*_name`) list the files it has.  A prompt may only go to a peer that has every node type
it uses and every model file it names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

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
    classes, models, nodes = set(), set(), []
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
            inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
            links = {name: str(v[0]) for name, v in inputs.items()
                     if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt}
            if not ready:
                stack.append((nid, True))
                stack.extend((up, False) for up in links.values() if up not in keys)
                continue
            parts = [[name, keys.get(links[name], 0), inputs[name][1]] if name in links else [name, inputs[name]]
                     for name in sorted(inputs)]  # a link in a cycle (invalid anyway) counts as 0
            keys[nid] = hash(json.dumps([node.get("class_type"), parts], default=str))
    return frozenset(keys.values())


def merge_catalogs(infos: list[dict]) -> dict[str, dict]:
    """The peers' node definitions as one: a class several peers have gets the first
    definition, with every combo's values from all of them, so a model or image any
    peer has is offered (and accepted) once."""
    merged: dict[str, dict] = {}
    for info in infos:
        for cls, spec in info.items():
            if cls not in merged:
                merged[cls] = spec
            elif isinstance(spec, dict) and isinstance(merged[cls], dict):
                merged[cls] = _with_combos_of(merged[cls], spec)
    return merged


def _with_combos_of(base: dict, other: dict) -> dict:
    out = None
    for category, section in (base.get("input") or {}).items():
        theirs = ((other.get("input") or {}).get(category)) if isinstance(other.get("input"), dict) else None
        if not isinstance(section, dict) or not isinstance(theirs, dict):
            continue
        for name, spec in section.items():
            mine, more = _combo_list(spec), _combo_list(theirs.get(name))
            if mine is None or more is None or not set(more) - set(mine):
                continue
            values = mine + [v for v in more if v not in set(mine)]
            if out is None:
                out = {**base, "input": {k: dict(v) if isinstance(v, dict) else v for k, v in base["input"].items()}}
            out["input"][category][name] = ([values, *spec[1:]] if isinstance(spec[0], list)
                                            else [spec[0], {**spec[1], "options": values}, *spec[2:]])
    return out if out is not None else base


def _combo_list(spec) -> list | None:
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        return list(spec[1]["options"])
    return None


def _combo(spec) -> frozenset[str] | None:
    """The values of a combo input, in either of ComfyUI's spellings, else None."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return frozenset(str(v) for v in spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return frozenset(str(v) for v in spec[1].get("options") or [])
    return None


class Capabilities:
    """A peer's node types and model lists, from its /object_info."""

    def __init__(self, object_info: dict) -> None:
        self.classes = frozenset(object_info)
        self.combos: dict[tuple[str, str], frozenset[str]] = {}
        for cls, info in object_info.items():
            for section in ((info or {}).get("input") or {}).values():
                if isinstance(section, dict):
                    for name, spec in section.items():
                        values = _combo(spec) if name.endswith("_name") else None
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
