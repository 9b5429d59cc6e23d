"""Routing rules written into a workflow: the ComfyLBRoute node (see nodes.py).

Pure: the node is taken out of the graph before validation and dispatch (peers need not
have ComfyLB installed) and its `target` becomes the set of peer names or tags the prompt
may run on.
"""
from __future__ import annotations

ROUTE_CLASS = "ComfyLBRoute"


def parse_targets(text: str) -> frozenset[str]:
    return frozenset(t.strip() for t in text.replace(";", ",").split(",") if t.strip())


def extract(prompt: dict) -> tuple[dict, frozenset[str] | None, dict[str, frozenset[str]]]:
    """(prompt without routing nodes, allowed peer names/tags or None, targets per routing node).

    Several routing nodes narrow each other (every rule must hold)."""
    rules = {nid: parse_targets(str((node.get("inputs") or {}).get("target", "")))
             for nid, node in prompt.items()
             if isinstance(node, dict) and node.get("class_type") == ROUTE_CLASS}
    if not rules:
        return prompt, None, {}
    stripped = {nid: node for nid, node in prompt.items() if nid not in rules}
    allowed: frozenset[str] | None = None
    for targets in rules.values():
        if targets:
            allowed = targets if allowed is None else allowed & targets
    return stripped, allowed, rules


def per_peer_outputs(prompt: dict, peer: str) -> dict:
    """Save nodes write into a subfolder named after the peer (`filename_prefix` "x" →
    "peer/x"): every peer numbers its files from 1, so without this two peers produce the
    same file name and /view could not tell them apart."""
    out = None
    for nid, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        prefix = inputs.get("filename_prefix") if isinstance(inputs, dict) else None
        if isinstance(prefix, str) and not prefix.startswith(f"{peer}/"):
            if out is None:
                out = dict(prompt)
            out[nid] = {**node, "inputs": {**inputs, "filename_prefix": f"{peer}/{prefix}"}}
    return out if out is not None else prompt
