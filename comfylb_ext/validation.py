"""Up-front prompt validation: what every peer would reject, in ComfyUI's 400 shapes.

Pure: takes the prompt and a catalog of node definitions (the union of the peers'
`/object_info`).  Mirrors execution.py validate_prompt / validate_inputs: structure, node
existence, output nodes, required inputs, link types and literal values (conversion to
INT/FLOAT/STRING/BOOLEAN, min/max, combo lists, upload file names).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Generator

from .errors import Error
from .errors import error as _err

KnownFiles = Callable[[str], bool]
InputInfo = list  # [input_type, extra]: ComfyUI's `input_config` tuple, as JSON sends it
Check = Generator[str, bool, bool]  # yields a linked node id, is sent its validity

ANY = "*"  # ComfyUI's wildcard type
# What checking an odd prompt can raise.  ComfyUI reports exceptions raised while
# validating a node as exception_during_(inner_)validation instead of failing the request.
RAISED = (LookupError, TypeError, ValueError, AttributeError, ArithmeticError)
# Upload pickers whose core loader (LoadImage, LoadImageMask, LoadImageOutput, LoadAudio,
# LoadVideo) has VALIDATE_INPUTS: ComfyUI asks whether the file exists instead of checking
# the list, and says so in these words.
UPLOAD_MESSAGES = {"image_upload": "Invalid image file: {}", "audio_upload": "Invalid audio file: {}",
                   "video_upload": "Invalid video file: {}"}
# Load3D's picker has no VALIDATE_INPUTS: ComfyUI checks its list as for any combo.
LIST_UPLOAD = "file_upload"
# Model pickers (ckpt_name, lora_name …) list each peer's own files, and the catalog holds
# one peer's definition of each node: capability.py checks their values against every peer.
MODEL_PICKER = "_name"


def _inputs_of(info: dict, category: str) -> dict:
    section = (info.get("input") or {}).get(category) or {}
    return section if isinstance(section, dict) else {}


def _declared(info: dict) -> list[tuple[str, str, Any]]:
    """(category, name, spec) of a node's inputs; a name in both sections is required,
    as get_input_info has it."""
    required = _inputs_of(info, "required")
    optional = {k: v for k, v in _inputs_of(info, "optional").items() if k not in required}
    return [("required", k, v) for k, v in required.items()] + [("optional", k, v) for k, v in optional.items()]


def _info(spec: Any) -> InputInfo:
    """[input_type, extra] of an input spec, like get_input_info (extra {} when absent)."""
    if not isinstance(spec, list) or not spec:
        return [None, {}]
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return [spec[0], extra]


def _type_name(ex: BaseException) -> str:
    """execution.full_type_name."""
    module = type(ex).__module__
    return type(ex).__qualname__ if module == "builtins" else f"{module}.{type(ex).__qualname__}"


def _is_combo(input_type: Any) -> bool:
    return isinstance(input_type, list) or input_type == "COMBO"


def _dynamic(io_type: Any) -> bool:
    """A V3 dynamic input/output (autogrow, dynamic combo …): ComfyUI checks links against
    the type it resolves from the prompt, which /object_info does not show; a match type
    (COMFY_MATCHTYPE_V3) it leaves to the frontend."""
    return isinstance(io_type, str) and io_type.startswith("COMFY_") and io_type.endswith("_V3")


def _types_match(received: Any, wanted: Any) -> bool:
    """comfy_execution.validation.validate_node_input (not strict), newest ComfyUI: equal,
    a wildcard, a combo list into COMBO, or comma-separated unions that overlap."""
    if received == wanted or ANY in (received, wanted):
        return True
    if _dynamic(received) or _dynamic(wanted):
        return True  # see _dynamic: don't guess, the peer checks
    if isinstance(received, list) and wanted == "COMBO":
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in wanted.split(",")}
    return ANY in got or ANY in want or bool(got & want)


def _unwrap(val: Any) -> Any:
    """Widget values that are lists come as {"__value__": [...]}: a bare list is a link."""
    return val["__value__"] if isinstance(val, dict) and "__value__" in val else val


def _convert(input_type: Any, val: Any) -> Any:
    """The conversions ComfyUI applies (and keeps): int("5") is 5, int(5.7) is 5, int(True)
    is 1, bool("false") is True."""
    if input_type == "INT":
        return int(val)
    if input_type == "FLOAT":
        return float(val)
    if input_type == "STRING":
        return str(val)
    if input_type == "BOOLEAN":
        return bool(val)
    return val


def _options(info: InputInfo) -> Any:
    """A combo's options in either spelling: [[...], {...}] or ["COMBO", {"options": [...]}]."""
    return info[1].get("options", []) if info[0] == "COMBO" else info[0]


def _combo_error(name: str, info: InputInfo, val: Any) -> Error | None:
    """value_not_in_list, in the newest ComfyUI's words (each bad value repr()'d; 0.3.75
    wrote '{val}' in quotes, which reads the same for a string)."""
    if info[0] == "COMBO" and (info[1].get("remote_combo") or (info[1].get("remote") and "options" not in info[1])):
        # The browser fetches these options; the server has none to check.  ComfyUI skips
        # only remote_combo, but a `remote` combo without options would refuse every value
        # unless its node validates it itself, which /object_info doesn't tell: the peer decides.
        return None
    options = _options(info)
    if info[1].get("multiselect", False) and isinstance(val, list):
        bad = [v for v in val if v not in options]
    else:
        bad = [val] if val not in options else []
    if not bad:
        return None
    big = len(options) > 20  # ComfyUI doesn't echo long lists (all those model files)
    listed = f"(list of length {len(options)})" if big else str(options)
    return _err("value_not_in_list", "Value not in list", f"{name}: {', '.join(repr(v) for v in bad)} not in {listed}",
                {"input_name": name, "input_config": None if big else info, "received_value": val})


def _value_error(name: str, info: InputInfo, raw: Any) -> Error | None:
    """The first thing wrong with a literal input value, in ComfyUI's order: conversion,
    min, max, combo list.  A comparison that cannot be made raises, as in ComfyUI."""
    input_type, extra = info
    val = _unwrap(raw)
    try:
        val = _convert(input_type, val)
        if isinstance(val, float) and not math.isfinite(val):
            # ComfyUI takes "nan" and "inf" for a FLOAT; every JSON answer carrying one then
            # breaks (JSON has no NaN), so ComfyLB refuses them as unconvertible
            raise ValueError(f"{val} is not a finite number")
    except (TypeError, ValueError, ArithmeticError) as ex:
        return _err("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                    f"{name}, {_unwrap(raw)}, {ex}", {"input_name": name, "input_config": info,
                                                      "received_value": _unwrap(raw), "exception_message": str(ex)})
    bound = {"input_name": name, "input_config": info, "received_value": val}
    if "min" in extra and val < extra["min"]:
        return _err("value_smaller_than_min", f"Value {val} smaller than min of {extra['min']}", name, bound)
    if "max" in extra and val > extra["max"]:
        return _err("value_bigger_than_max", f"Value {val} bigger than max of {extra['max']}", name, bound)
    return _combo_error(name, info, val) if _is_combo(input_type) else None


def _upload_flag(info: InputInfo) -> str | None:
    if not _is_combo(info[0]):
        return None
    return next((f for f in (*UPLOAD_MESSAGES, LIST_UPLOAD) if info[1].get(f) is True), None)


def _upload_error(name: str, info: InputInfo, raw: Any, flag: str, known: KnownFiles) -> Error | None:
    """The loader's VALIDATE_INPUTS (the file must exist) where the peer's list or ComfyLB's
    own store stands in for the peer's input folder."""
    val = _unwrap(raw)
    if not isinstance(val, str):  # folder_paths.annotated_filepath calls name.endswith
        raise AttributeError(f"'{type(val).__name__}' object has no attribute 'endswith'")
    if val in _options(info) or known(val):
        return None
    return _err("custom_validation_failed", "Custom validation failed for node",
                f"{name} - {UPLOAD_MESSAGES[flag].format(val)}", {"input_name": name})


class _Checker:
    """validate_inputs over the graph, with ComfyUI's `validated` memo: node id →
    (ok, its own errors); a node failing only through its inputs has no errors.

    ComfyUI recurses into linked nodes.  Here each node's check is a generator that
    yields the id of a linked node it needs and is sent back that node's result (or has
    its exception thrown in), driven by an explicit stack: the same order and the same
    exception handling, with no depth limit but the prompt's size.
    """

    def __init__(self, prompt: dict, catalog: dict[str, dict], known: KnownFiles | None, link_types: bool) -> None:
        self.prompt, self.catalog, self.known, self.link_types = prompt, catalog, known, link_types
        self.validated: dict[str, tuple[bool, list[Error]]] = {}
        self.visiting: set[str] = set()

    def run(self, output: str) -> bool:
        """Whether an output node and everything it depends on is valid; raises what
        validating the output node itself raised."""
        stack: list[Check] = [self._node(output)]
        value: bool | None = None  # None only for a check not started yet
        raised: BaseException | None = None
        while True:
            try:
                check = stack[-1]
                needed = check.throw(raised) if raised is not None else check.send(value)  # type: ignore[arg-type]
            except StopIteration as done:
                stack.pop()
                value, raised = done.value, None
            except (*RAISED, RecursionError) as ex:
                stack.pop()
                value, raised = None, ex
            else:
                stack.append(self._node(needed))
                value, raised = None, None
                continue
            if not stack:
                if raised is not None:
                    raise raised
                return bool(value)

    def _node(self, node_id: str) -> Check:
        """A cycle raises RecursionError: the output fails with exception_during_validation."""
        if node_id in self.validated:
            return self.validated[node_id][0]
        if node_id in self.visiting:
            raise RecursionError(f"cycle through node {node_id}")
        self.visiting.add(node_id)
        try:
            valid, errors = yield from self._inputs(node_id)
        finally:
            self.visiting.discard(node_id)
        self.validated[node_id] = (valid and not errors, errors)
        return self.validated[node_id][0]

    def _inputs(self, node_id: str) -> Generator[str, bool, tuple[bool, list[Error]]]:
        node = self.prompt[node_id]
        inputs = node.get("inputs") or {}
        errors: list[Error] = []
        uploads: list[tuple[str, InputInfo, Any, str]] = []
        valid = True
        for category, name, spec in _declared(self.catalog[node["class_type"]]):
            if name not in inputs:
                if category == "required":
                    errors.append(_err("required_input_missing", "Required input is missing", name,
                                       {"input_name": name}))
                continue
            info, val = _info(spec), inputs[name]
            if isinstance(val, list):
                linked_ok, error = yield from self._link(name, info, val)
                valid = valid and linked_ok
            else:
                error = self._literal(name, info, val, uploads)
            if error is not None:
                errors.append(error)
        if self.known is not None:  # after every input, as ComfyUI runs VALIDATE_INPUTS last
            found = (_upload_error(*upload, self.known) for upload in uploads)
            errors += [e for e in found if e is not None]
        return valid, errors

    def _literal(self, name: str, info: InputInfo, val: Any, uploads: list) -> Error | None:
        if _is_combo(info[0]) and name.endswith(MODEL_PICKER):
            return None  # which peer has which model is capability's to judge, not one peer's list
        flag = _upload_flag(info)
        if flag is None:
            return _value_error(name, info, val)
        if self.known is None or info[1].get("allow_batch"):
            return None  # ComfyLB may hold the file, or a batch of them: left to the peer
        if flag in UPLOAD_MESSAGES:
            uploads.append((name, info, val, flag))  # VALIDATE_INPUTS replaces the default checks
            return None
        unwrapped = _unwrap(val)
        if isinstance(unwrapped, str) and self.known(unwrapped):
            return None  # a file ComfyLB holds reaches the peer's list before the peer checks
        return _value_error(name, info, val)

    def _link(self, name: str, info: InputInfo, val: list) -> Generator[str, bool, tuple[bool, Error | None]]:
        """(linked node valid, this input's error).  A missing node or output slot raises,
        as in ComfyUI; so does checking the linked node, which is then reported on it."""
        if len(val) != 2:
            return True, _err("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                              name, {"input_name": name, "input_config": info, "received_value": val})
        src = val[0]
        if not isinstance(src, str) or not isinstance(self.prompt.get(src), dict):
            raise KeyError(src)
        if self.link_types:
            mismatch = self._mismatch(name, info, val)
            if mismatch is not None:  # and then ComfyUI does not look at the linked node
                return True, mismatch
        try:
            return (yield src), None
        except RAISED as ex:
            self.validated[src] = (False, [_err(
                "exception_during_inner_validation", "Exception when validating inner node", str(ex),
                {"input_name": name, "input_config": info, "exception_message": str(ex),
                 "exception_type": _type_name(ex), "traceback": [], "linked_node": val})])
            return False, None

    def _mismatch(self, name: str, info: InputInfo, val: list) -> Error | None:
        """return_type_mismatch; a slot the linked node lacks raises, as in ComfyUI."""
        received = tuple(self.catalog[self.prompt[val[0]]["class_type"]].get("output") or ())[val[1]]
        if _types_match(received, info[0]):
            return None
        return _err("return_type_mismatch", "Return type mismatch between linked nodes",
                    f"{name}, received_type({received}) mismatch input_type({info[0]})",
                    {"input_name": name, "input_config": info, "received_type": received, "linked_node": val})


def _structure(prompt: Any, catalog: dict[str, dict] | None,
               partial: list[str] | None) -> tuple[Error | None, list[str]]:
    """(the error that refuses the whole prompt, else None; its output nodes)."""
    if not isinstance(prompt, dict):
        return _err("invalid_prompt", "Prompt must be an object mapping node ids to nodes.",
                    f"got {type(prompt).__name__}"), []
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _err("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                        f"Node ID '#{node_id}'"), []
        class_type = node["class_type"]
        if not isinstance(node.get("inputs", {}), dict):
            return _err("invalid_prompt", "Node inputs must be an object.", f"Node ID '#{node_id}'"), []
        if catalog is None:
            continue
        info = catalog.get(class_type) if isinstance(class_type, str) else None
        if info is None:
            return _err("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                        f"Node ID '#{node_id}'"), []
        if info.get("output_node") is True and (partial is None or node_id in partial):
            outputs.append(node_id)
    return None, outputs


def _outputs(checker: _Checker, outputs: list[str]) -> tuple[bool, Error | None, list[str], dict]:
    """validate_prompt's loop: an output fails with any node it depends on, the others
    still run; node_errors lists the nodes with errors of their own."""
    validated, prompt = checker.validated, checker.prompt
    good: list[str] = []
    failed: list[tuple[str, list[Error]]] = []
    node_errors: dict[str, dict] = {}
    for o in outputs:
        try:
            ok = checker.run(o)
        except (*RAISED, RecursionError) as ex:
            reasons = [_err("exception_during_validation", "Exception when validating node", str(ex),
                            {"exception_type": _type_name(ex), "traceback": []})]
            validated[o] = (False, reasons)
            checker.visiting.clear()
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


def validate(prompt: Any, catalog: dict[str, dict] | None, partial: list[str] | None = None,
             known_files: KnownFiles | None = None, *,
             link_types: bool = False) -> tuple[bool, Error | None, list[str], dict]:
    """(ok, error, outputs_to_execute, node_errors), like execution.validate_prompt.

    With no catalog (no peer has answered yet) only the structure is checked and the
    outputs are left to the peer.  `known_files(name)` says whether ComfyLB holds an input
    file: upload pickers (LoadImage's `image` …) accept a file in the peer's list or one it
    holds.  Without it they are not checked at all, since the file may be one ComfyLB will
    hand the peer before the peer validates.

    `link_types` adds ComfyUI's return_type_mismatch check of each link.  Off by default:
    /object_info shows a custom node's wildcard (an AnyType str subclass whose __ne__ always
    says equal) as a plain string, so only "*" is recognisable as one, and callers' prompts
    that link mismatched types to reach a later check (capability) would now stop here.
    """
    error, outputs = _structure(prompt, catalog, partial)
    if error is not None:
        return False, error, [], {}
    if catalog is None:
        return True, None, [], {}
    if not outputs:
        return False, _err("prompt_no_outputs", "Prompt has no outputs"), [], {}
    return _outputs(_Checker(prompt, catalog, known_files, link_types), outputs)
