"""Peer events → the right client sockets, in ComfyUI's routing rules (server.py send_sync).

The host supplies a `Hub` (its client sockets); this module decides who gets what and
translates previews for clients that did not announce `supports_preview_metadata`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any, Protocol

from .delivery import INTERLEAVE_FLAG, Delivery, Send
from .mailbox import KEPT, Mailbox, Sent

log = logging.getLogger(__name__)

KEPT_CHECK_EVERY = 0.5  # seconds between looks for returned clients with results waiting
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
    def client_flags(self, sid: str) -> dict: ...

    # Live state (peer addresses, errors, other clients' ids) goes only to the sockets a
    # client allowed to read /lb/* registered (POST /lb/subscribe), never to every socket.
    def watch(self, sid: str) -> bool:
        """The socket(s) open now under `sid` receive send_watchers(); False: none is open.
        A socket opened later under the same id is not included: it must ask again."""
        ...

    async def send_watchers(self, event: str, data: Any) -> None: ...
    def connected(self, sid: str) -> bool: ...


# Asset-record ids a peer with assets enabled adds to output items: they name rows in that
# peer's own database and mean nothing (a 404) anywhere else.
PEER_LOCAL_KEYS = ("id", "preview_id")


def without_asset_ids(output: Any) -> Any:
    """A node's outputs ({kind: [item, …]}) with the peer-local asset ids taken out."""
    if not isinstance(output, dict):
        return output
    out = {}
    for kind, items in output.items():
        if isinstance(items, list):
            items = [{k: v for k, v in i.items() if k not in PEER_LOCAL_KEYS} if isinstance(i, dict) else i
                     for i in items]
        out[kind] = items
    return out


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


def frame_prompt(event: int, payload: bytes, running: str | None) -> str | None:
    """The prompt a peer's binary frame belongs to: a preview with metadata names it (None
    if it names none); any other frame is the one its peer is running."""
    if event != PREVIEW_IMAGE_WITH_METADATA:
        return running
    parsed = parse_preview(payload)
    pid = parsed[0].get("prompt_id") if parsed else None
    return pid if isinstance(pid, str) else None


def legacy_preview(meta: dict, image: bytes) -> bytes:
    """Type-4 → type-1 payload: u32 format (1 = JPEG, 2 = PNG) + image."""
    fmt = 1 if "jpeg" in str(meta.get("image_type", "")) else 2
    return struct.pack(">I", fmt) + image


class Relay:
    """A prompt's messages to its client, in the order one ComfyUI would send them
    (delivery.py); `end` once a prompt will say nothing more."""

    def __init__(self, hub: Hub, ordered: bool = True) -> None:
        self.hub = hub
        self.delivery = Delivery(ordered)
        self.mailbox = Mailbox()
        self.sent = Sent()

    def expect(self, client_id: str | None, prompt_id: str, key: tuple) -> None:
        self.delivery.expect(client_id, prompt_id, key)

    async def end(self, client_id: str | None, prompt_id: str) -> None:
        await self.delivery.end(client_id, prompt_id)

    async def _deliver(self, client_id: str | None, prompt_id: str | None, send: Send, size: int) -> None:
        interleave = bool(client_id and self.hub.client_flags(client_id).get(INTERLEAVE_FLAG))
        await self.delivery.send(client_id, prompt_id, send, size, interleave)

    async def json(self, client_id: str | None, event: str, data: Any, prompt_id: str | None = None) -> None:
        if client_id:
            await self._deliver(client_id, prompt_id, lambda: self._to_client(client_id, event, data), 1024)
        elif event in _BROADCAST_WITHOUT_CLIENT:
            await self.hub.send_json(event, data, None)

    async def _to_client(self, client_id: str, event: str, data: Any) -> None:
        result = event in KEPT or (event == "executing" and isinstance(data, dict) and data.get("node") is None)
        if self.hub.connected(client_id):
            await self.hub.send_json(event, data, client_id)
            if result:
                self.sent.note(client_id, event, data)
        elif result:
            self.mailbox.keep(client_id, event, data)  # its result: kept until the client is back

    async def resend(self, client_id: str, results: list[tuple[str, Any]]) -> None:
        """Results sent to a client go again, now or once it is back: the coordinator that
        passed them on died, maybe before they were out (`self.sent.since` says which)."""
        for event, data in results:
            self.mailbox.keep(client_id, event, data)
        await self.deliver_kept(client_id)

    async def keep_delivering(self) -> None:
        """Results kept for clients that were away reach them once they are back (a host
        that tells when a socket connects delivers them at once too)."""
        while True:
            await asyncio.sleep(KEPT_CHECK_EVERY)
            if self.mailbox:
                await self.deliver_kept()

    async def deliver_kept(self, client_id: str | None = None) -> None:
        """Results kept for clients that were away, to those now connected (`client_id`:
        the one that just connected)."""
        for sid in [client_id] if client_id else self.mailbox.waiting():
            if self.hub.connected(sid):
                for event, data in self.mailbox.take(sid):
                    await self.hub.send_json(event, data, sid)

    async def preview(self, client_id: str | None, payload: bytes, prompt_id: str | None = None) -> None:
        """A type-4 payload from a peer, to the client in the form it asked for."""
        parsed = parse_preview(payload)
        if parsed is None:
            log.debug("dropping malformed preview frame (%d bytes)", len(payload))
            return
        if client_id and self.hub.client_flags(client_id).get("supports_preview_metadata"):
            event, frame = PREVIEW_IMAGE_WITH_METADATA, payload
        else:
            event, frame = PREVIEW_IMAGE, legacy_preview(*parsed)
        await self._deliver(client_id, prompt_id, lambda: self.hub.send_bytes(event, frame, client_id or None),
                            len(frame))

    async def binary(self, client_id: str | None, event: int, payload: bytes, prompt_id: str | None = None) -> None:
        """Any other binary frame (legacy previews, progress text): passed through."""
        await self._deliver(client_id, prompt_id, lambda: self.hub.send_bytes(event, payload, client_id or None),
                            len(payload))
