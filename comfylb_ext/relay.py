"""Peer events → the right client sockets, in ComfyUI's routing rules (api.md §3.4).

The host supplies a `Hub` (its client sockets); this module decides who gets what and
translates previews for clients that did not announce `supports_preview_metadata`.
"""
from __future__ import annotations

import json
import logging
import struct
from typing import Any, Protocol

log = logging.getLogger(__name__)

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

# Sent to every socket when a prompt has no client_id (ComfyUI does the same); the rest
# of a prompt's messages then reach nobody.
_BROADCAST_WITHOUT_CLIENT = frozenset({"progress", "progress_state", "execution_interrupted"})


class Hub(Protocol):
    """The host's client sockets."""

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None: ...
    async def send_bytes(self, event: int, payload: bytes, sid: str | None = None) -> None: ...
    def wants_metadata(self, sid: str) -> bool: ...


def parse_preview(payload: bytes) -> tuple[dict, bytes] | None:
    """Split a type-4 payload into (metadata, image bytes)."""
    if len(payload) < 4:
        return None
    (n,) = struct.unpack(">I", payload[:4])
    try:
        meta = json.loads(payload[4:4 + n])
    except ValueError:
        return None
    return (meta, payload[4 + n:]) if isinstance(meta, dict) else None


def legacy_preview(meta: dict, image: bytes) -> bytes:
    """Type-4 → type-1 payload: u32 format (1 = JPEG, 2 = PNG) + image."""
    fmt = 1 if "jpeg" in str(meta.get("image_type", "")) else 2
    return struct.pack(">I", fmt) + image


class Relay:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def json(self, client_id: str | None, event: str, data: Any) -> None:
        if client_id:
            await self.hub.send_json(event, data, client_id)
        elif event in _BROADCAST_WITHOUT_CLIENT:
            await self.hub.send_json(event, data, None)

    async def preview(self, client_id: str | None, payload: bytes) -> None:
        """A type-4 payload from a peer, to the client in the form it asked for."""
        parsed = parse_preview(payload)
        if parsed is None:
            log.debug("dropping malformed preview frame (%d bytes)", len(payload))
            return
        if client_id and self.hub.wants_metadata(client_id):
            await self.hub.send_bytes(PREVIEW_IMAGE_WITH_METADATA, payload, client_id)
        else:
            await self.hub.send_bytes(PREVIEW_IMAGE, legacy_preview(*parsed), client_id or None)

    async def binary(self, client_id: str | None, event: int, payload: bytes) -> None:
        """Any other binary frame (legacy previews, progress text): passed through."""
        await self.hub.send_bytes(event, payload, client_id or None)

    async def status(self, queue_remaining: int) -> None:
        await self.hub.send_json("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}})
