"""Up-front prompt validation: what every peer would reject, in ComfyUI's 400 shapes.

Pure: takes the prompt and a catalog of node definitions (the union of the peers'
`/object_info`).  Checks structure, node existence, output nodes and required inputs
(execution.py validate_prompt / validate_inputs); value checks stay with the peer.
"""
from __future__ import annotations

from typing import Any

Error = dict[str, Any]


def _err(typ: str, message: str, details: str = "", extra: dict | None = None) -> Error:
    return {"type": typ, "message": message, "details": details, "extra_info": extra or {}}


def error_body(error: Error, node_errors: dict | None = None) -> dict:
    return {"error": error, "node_errors": node_errors or {}}


def _inputs_of(info: dict, category: str) -> dict:
    section = (info.get("input") or {}).get(category) or {}
    return section if isinstance(section, dict) else {}


def validate(prompt: Any, catalog: dict[str, dict] | None,
             partial: list[str] | None = None) -> tuple[bool, Error | None, list[str], dict]:
    """(ok, error, outputs_to_execute, node_errors), like execution.validate_prompt.

    With no catalog (no peer has answered yet) only the structure is checked and the
    outputs are left to the peer.
    """
    if not isinstance(prompt, dict):
        return False, _err("invalid_prompt", "Prompt must be an object mapping node ids to nodes.",
                           f"got {type(prompt).__name__}"), [], {}
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return False, _err("invalid_prompt",
                               "Cannot execute because a node is missing the class_type property.",
                               f"Node ID '#{node_id}'"), [], {}
        class_type = node["class_type"]
        if not isinstance(node.get("inputs", {}), dict):
            return False, _err("invalid_prompt", "Node inputs must be an object.", f"Node ID '#{node_id}'"), [], {}
        if catalog is None:
            continue
        info = catalog.get(class_type) if isinstance(class_type, str) else None
        if info is None:
            return False, _err("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                               f"Node ID '#{node_id}'"), [], {}
        if info.get("output_node") is True and (partial is None or node_id in partial):
            outputs.append(node_id)
    if catalog is None:
        return True, None, [], {}
    if not outputs:
        return False, _err("prompt_no_outputs", "Prompt has no outputs"), [], {}

    validated: dict[str, tuple[bool, list[Error]]] = {}
    visiting: set[str] = set()

    def check(node_id: str) -> bool:
        """validate_inputs: a link to a missing node raises, as in ComfyUI, and fails the
        whole output with exception_during_validation."""
        if node_id in validated:
            return validated[node_id][0]
        if node_id in visiting:
            raise RecursionError(f"cycle through node {node_id}")
        visiting.add(node_id)
        node = prompt[node_id]
        info = catalog[node["class_type"]]
        inputs = node.get("inputs") or {}
        errors: list[Error] = []
        valid = True
        for category in ("required", "optional"):
            for name in _inputs_of(info, category):
                if name not in inputs:
                    if category == "required":
                        errors.append(_err("required_input_missing", "Required input is missing",
                                           name, {"input_name": name}))
                    continue
                val = inputs[name]
                if not isinstance(val, list):
                    continue
                if len(val) != 2:
                    errors.append(_err("bad_linked_input",
                                       "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                       name, {"input_name": name, "received_value": val}))
                    continue
                src = val[0]
                if not isinstance(src, str) or not isinstance(prompt.get(src), dict):
                    raise KeyError(src)
                if not check(src):
                    valid = False
        visiting.discard(node_id)
        validated[node_id] = (valid and not errors, errors)
        return validated[node_id][0]

    good: list[str] = []
    failed: list[tuple[str, list[Error]]] = []
    node_errors: dict[str, dict] = {}
    for o in outputs:
        try:
            ok = check(o)
        except (KeyError, RecursionError) as ex:
            reasons = [_err("exception_during_validation", "Exception when validating node", str(ex),
                            {"exception_type": type(ex).__name__, "traceback": []})]
            validated[o] = (False, reasons)
            visiting.clear()
            ok = False
        if ok:
            good.append(o)
            continue
        failed.append((o, validated[o][1]))
        for node_id, (ok, reasons) in validated.items():
            if not ok and reasons:
                entry = node_errors.setdefault(node_id, {"errors": reasons, "dependent_outputs": [],
                                                         "class_type": prompt[node_id]["class_type"]})
                entry["dependent_outputs"].append(o)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        return False, _err("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), [], node_errors
    return True, None, good, node_errors
