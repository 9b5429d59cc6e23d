"""POST /prompt's checks, without HTTP: a prompt becomes a `Checked` admission or raises
a `Rejection` that carries ComfyUI's answer.

`check` is pure (it reads a `Context` taken beforehand) so that a prompt of tens of MB is
checked off the event loop; what needs the coordinator's live state (numbering, duplicate
ids, room in the queue) is done by the dispatcher on the loop afterwards.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from . import capability, cost, replacements, routing, validation
from .capability import Capabilities, Requirements
from .cost import Shape
from .errors import Rejection, now_ms
from .errors import error as _error
from .jobs import is_canonical_uuid
from .tasks import Numbering


class PeerInfo(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def caps(self) -> Capabilities | None: ...
    @property
    def tags(self) -> list[str]: ...
    def matches(self, targets: frozenset[str] | None) -> bool: ...


@dataclass
class Context:
    """What the peers offer, as one prompt's checks need it (taken on the event loop)."""
    nodes: dict[str, dict] | None                  # merged /object_info (None: no peer answered yet)
    swaps: dict[str, list[dict]]                   # node replacements
    peers: list[PeerInfo]                          # peers not removed
    known_file: Callable[[str], bool] = field(default=lambda name: False)


@dataclass
class Checked:
    prompt_id: str
    number: float
    prompt: dict
    extra_data: dict
    outputs: list[str]
    node_errors: dict
    partial: list[str] | None
    targets: frozenset[str] | None
    req: Requirements
    shape: Shape                    # for the cost model: made here, as it reads the whole prompt
    client_id: str | None


def invalid(message: str, details: str, typ: str = "invalid_prompt") -> Rejection:
    return Rejection(400, _error(typ, message, details))


def number(data: Any, numbering: Numbering) -> float:
    """Its place in the queue, taken first (a refused prompt uses up a number, as in
    ComfyUI).  Done on the event loop: the counter is the coordinator's."""
    if not isinstance(data, dict):
        raise invalid("Request body must be a JSON object.", type(data).__name__)
    try:
        return numbering.assign(data.get("number"), data.get("front"))
    except (TypeError, ValueError):
        raise invalid("number must be a number", repr(data.get("number"))) from None


def _prompt_id(data: dict) -> str:
    prompt_id = data.get("prompt_id")
    if prompt_id is None:
        return str(uuid.uuid4())
    if not is_canonical_uuid(prompt_id):  # today's ComfyUI refuses anything else, so a peer would later
        raise invalid("prompt_id must be a valid UUID",
                      "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                      "omit it to let the server generate one", "invalid_prompt_id")
    return str(prompt_id)


def check(data: dict, number: float, ctx: Context) -> Checked:
    """Everything about a prompt that its own content decides, in ComfyUI's order."""
    if "prompt" not in data:
        raise invalid("No prompt provided", "No prompt provided", "no_prompt")
    prompt = data["prompt"]
    prompt_id = _prompt_id(data)
    partial = data.get("partial_execution_targets")
    if partial is not None and not (isinstance(partial, list) and all(isinstance(x, str) for x in partial)):
        raise invalid("partial_execution_targets must be a list of node ids", repr(partial)[:200])
    targets = None
    if isinstance(prompt, dict):
        if ctx.nodes is not None and ctx.swaps:
            # as today's ComfyUI does before validating; peers get the replaced nodes
            prompt = replacements.apply(prompt, ctx.swaps, ctx.nodes)
        prompt, targets, rules = routing.extract(prompt)
        refusal = routing.unroutable(rules, {p.name: p.tags for p in ctx.peers})
        if refusal is not None:
            raise Rejection(400, *refusal)
    ok, error, outputs, node_errors = validation.validate(prompt, ctx.nodes, partial, ctx.known_file)
    if not ok:
        raise Rejection(400, error or {}, node_errors)
    req = capability.requirements(prompt)
    _runnable(req, targets, ctx.peers)
    extra = data.get("extra_data") or {}
    if not isinstance(extra, dict):
        raise invalid("extra_data must be an object", "")
    extra = dict(extra)
    extra["create_time"] = now_ms()  # as ComfyUI: the jobs API sorts and the UI validates by it
    client_id = data.get("client_id")
    if client_id is not None:
        extra["client_id"] = client_id
    return Checked(prompt_id, number, prompt, extra, outputs, node_errors, partial,
                   targets, req, cost.shape(prompt), str(client_id) if client_id else None)


def _runnable(req: Requirements, targets: frozenset[str] | None, peers: Iterable[PeerInfo]) -> None:
    """Refused when every peer it may run on is known and none has what it needs."""
    allowed = [p for p in peers if p.matches(targets)]
    known = {p.name: p.caps for p in allowed if p.caps is not None}
    if len(known) == len(allowed):
        refusal = capability.unrunnable(req, known)
        if refusal is not None:
            raise Rejection(400, *refusal)
