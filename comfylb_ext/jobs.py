"""ComfyUI's jobs API (/api/jobs) rules, as pure functions over plain data.

The 1.5x frontend reads its Queue, Job History and Generated panels only from /api/jobs,
and validates every response strictly (zod): one bad job discards the whole page. So the
shaping here follows ComfyUI's own comfy_execution/jobs.py and server.py field for field,
and treats malformed history entries by leaving fields out rather than raising.
"""
from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
QUEUE_STATUSES = frozenset({"pending", "in_progress"})
SORT_BY = ("created_at", "execution_duration")
SORT_ORDER = ("asc", "desc")

PREVIEWABLE_MEDIA = frozenset({"images", "video", "audio", "3d", "text"})
EXT_3D = (".obj", ".fbx", ".gltf", ".glb", ".usdz")
EXT_TEXT = (".txt", ".md", ".json")  # what SaveText writes
TEXT_PREVIEW_MAX = 1024
# ComfyUI pops these out of extra_data at queue time; never echo them in a detail.
SENSITIVE_KEYS = frozenset({"auth_token_comfy_org", "api_key_comfy_org"})
_TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class JobsError(ValueError):
    """A request ComfyUI answers with 400 {"error": message, **extra}."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


@dataclass(frozen=True)
class Query:
    statuses: frozenset[str]
    workflow_id: str | None
    sort_by: str
    sort_order: str
    limit: int | None
    offset: int


def parse_query(q: Mapping[str, str]) -> Query:
    """GET /api/jobs parameters, checked in ComfyUI's order with its exact messages."""
    statuses = frozenset(STATUSES)
    if q.get("status"):  # an empty value means "all", like an absent one
        wanted = [s.strip().lower() for s in q["status"].split(",") if s.strip()]
        invalid = [s for s in wanted if s not in STATUSES]
        if invalid:
            raise JobsError(f"Invalid status value(s): {', '.join(invalid)}. "
                            f"Valid values: {', '.join(STATUSES)}")
        statuses = frozenset(wanted)  # "," leaves it empty: ComfyUI then lists nothing
    sort_by = q.get("sort_by", "created_at").lower()
    if sort_by not in SORT_BY:
        raise JobsError("sort_by must be 'created_at' or 'execution_duration'")
    sort_order = q.get("sort_order", "desc").lower()
    if sort_order not in SORT_ORDER:
        raise JobsError("sort_order must be 'asc' or 'desc'")
    limit = None
    if "limit" in q:
        try:
            limit = int(q["limit"])
        except (TypeError, ValueError):
            raise JobsError("limit must be an integer") from None
        if limit <= 0:
            raise JobsError("limit must be a positive integer")
    offset = 0
    if "offset" in q:
        try:
            offset = max(0, int(q["offset"]))
        except (TypeError, ValueError):
            raise JobsError("offset must be an integer") from None
    return Query(statuses, q.get("workflow_id") or None, sort_by, sort_order, limit, offset)


def is_canonical_uuid(value: object) -> bool:
    """ComfyUI compares ids verbatim everywhere, so only the lowercase hyphenated form counts."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError, AttributeError):
        return False


def parse_cancel_ids(body: object) -> list[str]:
    """POST /api/jobs/cancel {"job_ids": [...]}: all ids must be canonical, or nothing is cancelled."""
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        raise JobsError("job_ids must be a list")
    invalid = [i if isinstance(i, str) else repr(i) for i in ids if not is_canonical_uuid(i)]
    if invalid:
        raise JobsError("job_ids contains invalid id(s)", invalid_ids=invalid)
    return list(ids)


# -- shaping -------------------------------------------------------------------------------
def _num(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _at(seq: Any, i: int) -> Any:
    return seq[i] if isinstance(seq, (list, tuple)) and len(seq) > i else None


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _base(item: Any, create_time: float | None) -> tuple[dict[str, Any], dict]:
    """Fields every job carries, from a [number, prompt_id, prompt, extra_data, ...] tuple."""
    extra = _dict(_at(item, 3))
    workflow_id = _dict(_dict(extra.get("extra_pnginfo")).get("workflow")).get("id")
    created = _num(extra.get("create_time"))
    if created is None:  # the frontend rejects a job without a numeric create_time
        created = _num(create_time) or 0
    return {
        "priority": _num(_at(item, 0)),
        "create_time": created,
        # a non-string id could never match the workflow_id filter and would fail the schema
        "workflow_id": workflow_id if isinstance(workflow_id, str) else None,
    }, extra


def _workflow(item: Any, extra: dict) -> dict[str, Any]:
    """What the frontend's "Open workflow" / "Load workflow" reads: extra_data.extra_pnginfo.workflow,
    else prompt as an API-format graph."""
    return {"prompt": _at(item, 2), "extra_data": {k: v for k, v in extra.items() if k not in SENSITIVE_KEYS}}


def queue_job(item: list, status: str, *, create_time: float | None = None) -> dict[str, Any]:
    """A running ("in_progress") or pending queue item as a list entry."""
    if status not in QUEUE_STATUSES:
        raise ValueError(f"queue job status must be pending or in_progress, not {status!r}")
    base, _ = _base(item, create_time)
    return _prune({"id": _at(item, 1), "status": status, **base,
                   "outputs_count": 0, "previewable_outputs_count": 0})


def queue_detail(item: list, status: str, *, create_time: float | None = None) -> dict[str, Any]:
    """GET /api/jobs/{id} for a queued job: the list entry plus the submitted workflow."""
    job = queue_job(item, status, create_time=create_time)
    job["workflow"] = _workflow(item, _dict(_at(item, 3)))
    return job


def history_job(prompt_id: str, entry: dict, detail: bool = False, *,
                create_time: float | None = None) -> dict[str, Any]:
    """A finished prompt's history entry as a list entry, or (detail) as GET /api/jobs/{id} has it."""
    entry = _dict(entry)
    item = entry.get("prompt")
    base, extra = _base(item, create_time)
    status_info = entry.get("status", {})
    info = _dict(status_info)
    status_str = info.get("status_str")
    summary = _dict(info.get("execution_summary"))

    start = end = error = success = None
    node_errors: list[dict] = []
    interrupted = False
    messages = info.get("messages")
    for msg in messages if isinstance(messages, (list, tuple)) else ():
        name, data = _at(msg, 0), _at(msg, 1)
        if not isinstance(data, dict):
            continue
        if name == "execution_start":
            start = data.get("timestamp")
        elif name in _TERMINAL_EVENTS:
            end = data.get("timestamp")
            if name == "execution_success":
                success = data
            elif name == "execution_error":
                error = data
            else:
                interrupted = True
        elif name == "execution_node_error":  # partial-success heads: one per failed node
            node_errors.append(data)

    if status_str == "error":
        status = "cancelled" if interrupted else "failed"
    else:  # "success", or no status at all: ComfyUI calls it completed
        status = "completed"

    completion = summary.get("completion_status")
    if completion is None and success is not None:
        completion = success.get("completion_status", "success")
    if completion is None and status_str == "success":
        completion = "success"
    has_errors = error_count = None
    if info:
        has_errors = summary.get("has_errors", bool(node_errors) or error is not None)
        error_count = summary.get("execution_error_count", len(node_errors) or int(error is not None))

    outputs = entry.get("outputs")
    count, preview = _outputs_summary(_dict(outputs))
    job = _prune({
        "id": prompt_id, "status": status, **base,
        "execution_start_time": _num(start), "execution_end_time": _num(end),
        "execution_error": error,
        "completion_status": completion, "has_errors": has_errors, "execution_error_count": error_count,
        "outputs_count": count,
        "previewable_outputs_count": _count_previewable(_dict(outputs)),
        "preview_output": preview,
    })
    if detail:
        if isinstance(outputs, dict) or outputs is None:
            job["outputs"] = _normalize_outputs(_dict(outputs))
        job["execution_status"] = status_info
        job["execution_errors"] = node_errors
        job["workflow"] = _workflow(item, extra)
    return job


# -- outputs ------------------------------------------------------------------------------
def _lower_str(value: Any) -> str:
    return value.lower() if isinstance(value, str) else ""


def _as_item(item: Any) -> dict | None:
    """Dicts pass; a bare 3D filename (Preview3D's output) becomes a file dict; others are not items."""
    if isinstance(item, dict):
        return item
    if isinstance(item, str) and item.lower().endswith(EXT_3D):
        return {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"}
    return None


def _previewable(media: str, item: dict) -> bool:
    fmt = item.get("format")
    name = _lower_str(item.get("filename"))
    return (media in PREVIEWABLE_MEDIA
            or (isinstance(fmt, str) and fmt.startswith(("video/", "audio/")))
            or name.endswith(EXT_3D) or name.endswith(EXT_TEXT))


def _is_text(media: str, item: dict) -> bool:
    return media == "text" or _lower_str(item.get("filename")).endswith(EXT_TEXT)


def _media_lists(outputs: dict) -> Iterable[tuple[str, str, list]]:
    for node_id, node in outputs.items():
        if not isinstance(node, dict):
            continue
        for media, items in node.items():
            if media != "animated" and isinstance(items, list):  # "animated" is a flag list
                yield node_id, media, items


def _text_preview(raw: Any) -> dict[str, Any]:
    # ComfyUI takes a tuple's first element; over JSON (our peers' /history) tuples are lists.
    value = (raw[0] if raw else "") if isinstance(raw, (list, tuple)) else raw
    value = value if isinstance(value, str) else str(value)
    if len(value) <= TEXT_PREVIEW_MAX:
        return {"content": value}
    return {"content": value[:TEXT_PREVIEW_MAX], "truncated": True}


def _outputs_summary(outputs: dict) -> tuple[int, dict | None]:
    """(outputs_count, preview_output). Preview ranks: saved visual media, any visual media,
    a saved text file, raw text; kept in separate slots so node order cannot let text win."""
    count = 0
    best = visual = text_file = text = None
    for node_id, media, items in _media_lists(outputs):
        for raw in items:
            item = _as_item(raw)
            if item is None:
                # raw text is preview-only metadata: a fallback preview, never counted
                if media == "text" and raw is not None and best is None and text is None:
                    text = {**_text_preview(raw), "nodeId": node_id, "mediaType": media}
                continue
            count += 1
            if best is not None or not _previewable(media, item):
                continue
            shown = {**item, "nodeId": node_id}
            shown.setdefault("mediaType", media)
            if _is_text(media, item):
                text_file = text_file or shown
            elif item.get("type") == "output":
                best = shown
            else:
                visual = visual or shown
    return count, best or visual or text_file or text


def _count_previewable(outputs: dict) -> int:
    """What the expanded asset view renders (the Media Assets badge), unlike outputs_count."""
    return sum(1 for _, media, items in _media_lists(outputs) for raw in items
               if (item := _as_item(raw)) is not None and _previewable(media, item))


def _normalize_outputs(outputs: dict) -> dict:
    """Detail outputs: None items dropped, 3D filenames as file dicts, everything else as is."""
    out: dict = {}
    for node_id, node in outputs.items():
        if not isinstance(node, dict):
            out[node_id] = node
            continue
        out[node_id] = {
            media: items if media == "animated" or not isinstance(items, list)
            else [_as_item(i) or i for i in items if i is not None]
            for media, items in node.items()
        }
    return out


# -- listing ------------------------------------------------------------------------------
def _duration(job: dict) -> float:
    start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
    return end - start if start and end else 0


def list_jobs(queue_jobs: list[dict], history_jobs: Iterable[dict], q: Query) -> dict[str, Any]:
    """The GET /api/jobs body. Running, then pending, then history (oldest first) go in before
    the stable sort, as in ComfyUI, so ties keep that order."""
    jobs = [j for j in queue_jobs if j.get("status") in q.statuses]
    if q.statuses - QUEUE_STATUSES:
        jobs += [j for j in history_jobs if j.get("status") in q.statuses]
    if q.workflow_id:
        jobs = [j for j in jobs if j.get("workflow_id") == q.workflow_id]
    key = _duration if q.sort_by == "execution_duration" else (lambda j: j.get("create_time", 0))
    jobs.sort(key=key, reverse=q.sort_order == "desc")
    total = len(jobs)
    page = jobs[q.offset:]
    if q.limit is not None:
        page = page[:q.limit]
    return {"jobs": page, "pagination": {"offset": q.offset, "limit": q.limit, "total": total,
                                         "has_more": q.offset + len(page) < total}}
