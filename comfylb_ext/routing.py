"""Routing rules written into a workflow: the ComfyLBRoute node (see nodes.py).

Pure: the node is taken out of the graph before validation and dispatch (peers need not
have ComfyLB installed) and its `target` becomes the set of peer names or tags the prompt
may run on.
"""
from __future__ import annotations

import re
from typing import Any

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


def _matches(name: str, tags: list[str], targets: frozenset[str]) -> bool:
    return name in targets or not targets.isdisjoint(tags)


def unroutable(rules: dict[str, frozenset[str]], peers: dict[str, list[str]]) -> tuple[dict, dict] | None:
    """ComfyUI's (error, node_errors) when the routing nodes name no peer we have
    (`peers`: name → tags), else None."""
    def err(message: str, details: str, extra: dict) -> dict:
        return {"type": "no_matching_peer", "message": message, "details": details, "extra_info": extra}

    node_errors: dict[str, dict[str, Any]] = {}
    for nid, targets in rules.items():
        if targets and not any(_matches(n, t, targets) for n, t in peers.items()):
            node_errors[nid] = {"errors": [err(
                "No peer matches this routing rule", f"target {', '.join(sorted(targets))!r}: no peer has this name or tag",
                {"input_name": "target", "received_value": ", ".join(sorted(targets)), "peers": sorted(peers)})],
                "dependent_outputs": [], "class_type": ROUTE_CLASS}
    allowed = None
    for targets in rules.values():
        if targets:
            allowed = targets if allowed is None else allowed & targets
    if not node_errors and allowed is not None and not any(_matches(n, t, allowed) for n, t in peers.items()):
        node_errors = {nid: {"errors": [err("No peer satisfies every routing rule together",
                                            f"targets {', '.join(sorted(t))!r}", {"input_name": "target"})],
                             "dependent_outputs": [], "class_type": ROUTE_CLASS} for nid, t in rules.items()}
    if not node_errors:
        return None
    error = {"type": "prompt_outputs_failed_validation", "message": "No peer can run this prompt",
             "details": "\n".join(e["errors"][0]["details"] for e in node_errors.values()), "extra_info": {}}
    return error, node_errors


def confined_prefix(prefix: str, peer: str) -> str:
    """A `filename_prefix` inside the peer's own folder: "x" → "peer/x".  Every way out
    is dropped, as ComfyUI would resolve it on any system: `..` and `.` components, a
    leading `/` (absolute), backslashes (separators on Windows), so "../other-peer/victim",
    "/abs/x" and "a\\..\\..\\b" become "peer/other-peer/victim", "peer/abs/x" and "peer/a/b".
    (ComfyUI does not percent-decode it: "%2e%2e" is a plain name.)"""
    parts = [p for p in re.split(r"[/\\]+", prefix) if p.strip(". ")]  # Windows reads "... " as ".."
    if len(parts) > 1 and parts[0] == peer:
        parts = parts[1:]  # already its own (a prompt sent to the same peer again)
    return "/".join([peer, *(parts or ["ComfyUI"])])


def per_peer_outputs(prompt: dict, peer: str) -> dict:
    """Save nodes write into a subfolder named after the peer (`filename_prefix` "x" →
    "peer/x"): every peer numbers its files from 1, so without this two peers produce the
    same file name and /view could not tell them apart; and no prompt can make a peer
    write into another peer's folder (confined_prefix).  A prefix that comes through a
    link is only known to the peer: what it reports is checked instead (outputs.claimable)."""
    out = None
    for nid, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        prefix = inputs.get("filename_prefix")
        if isinstance(prefix, str) and confined_prefix(prefix, peer) != prefix:
            if out is None:
                out = dict(prompt)
            out[nid] = {**node, "inputs": {**inputs, "filename_prefix": confined_prefix(prefix, peer)}}
    return out if out is not None else prompt
