"""Bounded JSON: what ComfyLB accepts from clients and peers, and what it sends.

Parsing (`loads`) refuses, with a `JSONError` (a ValueError) instead of a RecursionError, a
MemoryError or a hung event loop:
- nesting deeper than `max_depth` — found by a scan of the raw bytes *before* parsing, so
  json.loads never recurses that deep (a ~1000-deep body would otherwise raise
  RecursionError inside json.loads, and anything stored that deep cannot be loaded, copied
  or encoded again);
- more than `max_items` values (strings, object keys, numbers, arrays, objects, counted
  from the same scan) — a 32 MB body of one-character strings would otherwise become
  ~500 MB of Python objects;
- NaN, Infinity and numbers too large for a float (1e999): they are not JSON, and one in
  ComfyLB's state made every JSON answer that carries it unreadable to a browser.

Limits, chosen so that every real workflow passes:

| what                                   | depth | values    | bytes   |
|----------------------------------------|-------|-----------|---------|
| a client's `POST /prompt`              | 64    | 1,000,000 | 32 MB   |
| any other client JSON body             | 64    | 1,000,000 | 8 MB    |
| a peer's answer or websocket message   | 128   | 4,000,000 | 64 MB   |

A real ComfyUI API prompt nests 6-10 deep (the web UI's workflow, sent along in
`extra_data.extra_pnginfo`, about 12) and holds ~125 values per node with the web UI's
workflow included, so 1,000,000 values is a graph of ~8,000 nodes; the largest prompts seen
in practice, with images embedded as base64 strings, are a few MB.  A peer's `/history`
entry wraps a prompt in 4 more levels, hence 128 for peers; `/object_info` with many custom
nodes is ~20 MB and ~1,000,000 values.

`dumps` never writes NaN or Infinity: it encodes with `allow_nan=False` and, only if that
fails, again with every non-finite float replaced by null.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
from typing import Any

MAX_DEPTH = 64
MAX_ITEMS = 1_000_000
MAX_PROMPT_BYTES = 32 << 20
MAX_BODY_BYTES = 8 << 20
PEER_MAX_DEPTH = 128
PEER_MAX_ITEMS = 4_000_000
PEER_MAX_BYTES = 64 << 20
THREAD_ABOVE = 1 << 20  # bodies larger than this are parsed and encoded off the event loop

_STRING = re.compile(rb'"[^"]*"')
_STRUCTURE = b"[]{},:"
_DROP = bytes(c for c in range(256) if c not in _STRUCTURE)
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


class JSONError(ValueError):
    """Not acceptable JSON; `reason` is "syntax", "depth", "items", "size" or "number"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def scan(raw: bytes | bytearray, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> None:
    """Refuse a body nested deeper than `max_depth` or holding more than `max_items`
    values, from its bytes alone (UTF-8: no byte of a multi-byte character is ASCII).

    Values are counted as separators and containers: commas + colons (object keys) +
    arrays and objects + 1, which is every value, key and container of the document.
    Brackets, commas and colons inside strings do not count.  Each step is one C-speed
    pass over the bytes."""
    opens = raw.count(b"[") + raw.count(b"{")
    if opens <= max_depth and opens + raw.count(b",") + raw.count(b":") < max_items:
        return  # cannot be deeper than it has brackets, nor hold more than this
    text = raw
    if b"\\" in text:  # outside strings a backslash is invalid anyway
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    quotes = text.count(b'"')
    strings = quotes // 2
    if strings > max_items:
        raise JSONError("items", f"more than {max_items:,} values")
    outside = _STRING.sub(b"", text) if quotes else text  # no escaped quote is left to end one early
    marks = outside.translate(None, _DROP)
    separators = marks.count(b",") + marks.count(b":")
    brackets = marks.translate(None, b",:") if separators else marks
    containers = len(brackets) - brackets.count(b"]") - brackets.count(b"}")
    if separators + containers + 1 > max_items:
        raise JSONError("items", f"more than {max_items:,} values")
    if containers > max_depth and max(itertools.accumulate(map(_STEP.__getitem__, brackets))) > max_depth:
        raise JSONError("depth", f"nested deeper than {max_depth} levels")


def _constant(name: str) -> Any:
    raise JSONError("number", f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONError("number", f"{text[:40]} is too large for a number")
    return value


def loads(raw: bytes | bytearray | str, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS,
          max_bytes: int | None = None) -> Any:
    """Parse JSON within the limits (see the module's docstring); JSONError otherwise."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if max_bytes is not None and len(data) > max_bytes:
        raise JSONError("size", f"larger than {max_bytes >> 20} MB")
    scan(data, max_depth, max_items)
    try:
        text = raw if isinstance(raw, str) else data.decode("utf-8")
        return json.loads(text, parse_constant=_constant, parse_float=_float)
    except JSONError:
        raise
    except RecursionError:  # not reached after scan(); kept so nothing deep escapes as a 500
        raise JSONError("depth", "nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise JSONError("syntax", str(e)) from None


async def loads_async(raw: bytes | bytearray | str, **limits: Any) -> Any:
    """loads(), in a worker thread for a large body: the event loop keeps serving."""
    if len(raw) > THREAD_ABOVE:
        return await asyncio.to_thread(loads, raw, **limits)
    return loads(raw, **limits)


def peer_loads(raw: bytes | bytearray | str) -> Any:
    """loads() with the limits for what a peer sends."""
    return loads(raw, max_depth=PEER_MAX_DEPTH, max_items=PEER_MAX_ITEMS, max_bytes=PEER_MAX_BYTES)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (iterative: any depth)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, (dict, list, tuple)):
        return value
    root = [value]
    stack = [(root, 0, value)]
    while stack:
        parent, key, node = stack.pop()
        if isinstance(node, dict):
            copy: Any = dict(node)
            items = copy.items()
        else:
            copy = list(node)
            items = enumerate(copy)
        parent[key] = copy
        for k, v in list(items):
            if isinstance(v, float) and not math.isfinite(v):
                copy[k] = None
            elif isinstance(v, (dict, list, tuple)):
                stack.append((copy, k, v))
    return root[0]


def dumps(value: Any, **kw: Any) -> str:
    """json.dumps that never writes NaN or Infinity (they become null)."""
    try:
        return json.dumps(value, allow_nan=False, **kw)
    except ValueError:
        return json.dumps(finite(value), allow_nan=False, **kw)


async def dumps_async(value: Any, big: bool = True) -> str:
    """dumps(), in a worker thread when `big`: the event loop keeps serving.  The value
    must not change meanwhile (history entries and finished tasks never do)."""
    return await asyncio.to_thread(dumps, value) if big else dumps(value)


def depth(value: Any) -> int:
    """How deep a parsed value nests (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, (list, tuple)):
            continue
        deepest = max(deepest, level)
        stack.extend((v, level + 1) for v in node if isinstance(v, (dict, list, tuple)))
    return deepest
