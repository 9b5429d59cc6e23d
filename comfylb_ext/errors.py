"""ComfyUI's error shapes, built one way each: the error dict of a 400 from POST /prompt,
the refusal that carries it, and the `execution_error` / `execution_interrupted` messages
of a prompt that ComfyLB ends itself."""
from __future__ import annotations

import time
from typing import Any

Error = dict[str, Any]


def error(typ: str, message: str, details: str = "", extra: dict | None = None) -> Error:
    """ComfyUI's error dict ({type, message, details, extra_info})."""
    return {"type": typ, "message": message, "details": details, "extra_info": extra or {}}


def error_body(err: Error, node_errors: dict | None = None) -> dict:
    """The body of POST /prompt's 400: {error, node_errors}."""
    return {"error": err, "node_errors": node_errors or {}}


class Rejection(Exception):
    """A prompt not accepted, with ComfyUI's answer: the API layer sends it as it is."""

    def __init__(self, status: int, err: Error, node_errors: dict | None = None) -> None:
        super().__init__(err.get("message"))
        self.status = status
        self.body = error_body(err, node_errors)


def now_ms() -> int:
    return int(time.time() * 1000)


def execution_error(prompt_id: str, message: str, exception_type: str, node_id: Any = None,
                    node_type: Any = None) -> dict:
    """The execution_error of a prompt that no peer finished.  node_id and node_type are
    strings: the newest web UI drops its whole job list over one that is not."""
    return {"prompt_id": prompt_id, "node_id": str(node_id or ""), "node_type": str(node_type or ""),
            "executed": [], "exception_message": message, "exception_type": exception_type, "traceback": [],
            "current_inputs": {}, "current_outputs": [], "timestamp": now_ms()}


def execution_interrupted(prompt_id: str) -> dict:
    """What ComfyUI says of a prompt interrupted before any node ran."""
    return {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [], "timestamp": now_ms()}


def peer_refusal(prompt_id: str, peer: str, status: int, body: Any) -> dict:
    """A peer's refusal at dispatch, as the execution_error a client understands."""
    node_id = node_type = None
    lines = []
    if isinstance(body, dict):
        err = body.get("error") or {}
        if isinstance(err, str):  # some ComfyUI versions answer {"error": "text"}
            lines.append(err)
        elif isinstance(err, dict):
            lines.append(f"{err.get('message', '')}: {err.get('details', '')}".strip(": "))
        node_errors = body.get("node_errors")
        for nid, ne in (node_errors.items() if isinstance(node_errors, dict) else ()):
            if not isinstance(ne, dict) or not isinstance(ne.get("errors", []), list):
                continue
            node_id = node_id or nid
            node_type = node_type or ne.get("class_type")
            for e in ne.get("errors", []):
                if isinstance(e, dict):
                    lines.append(f"{ne.get('class_type', nid)} {nid}: {e.get('message', '')}: {e.get('details', '')}")
    else:
        lines.append(str(body)[:500])
    return execution_error(prompt_id, f"Peer {peer} refused the prompt (HTTP {status}): " + "\n".join(lines),
                           "comfylb.PeerRejected", node_id, node_type)
