"""The cluster's node catalog: every peer's `/object_info` merged, and the node
replacements today's ComfyUI peers declare.  A peer's malformed catalog is its own
problem (logged and ignored), never the cluster's."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine, Iterable

from . import capability, replacements
from .peer import SMALL_BODY, Peer, PeerError

log = logging.getLogger(__name__)

ANSWER_WITHIN = 5.0   # seconds a request waits for peers' answers (the newest web UI gives up after 60)


class Catalog:
    def __init__(self, peers: Callable[[], Iterable[Peer]], spawn: Callable[[Coroutine[Any, Any, Any]], Any],
                 on_change: Callable[[], None]) -> None:
        self.peers = peers
        self.spawn = spawn
        self.on_change = on_change  # what a peer offers changed: prompts waiting for it may go
        self._merged: dict[str, dict] | None = None
        self._swaps: dict[str, list[dict]] = {}

    def invalidate(self) -> None:
        self._merged = None

    def merged(self) -> dict[str, dict] | None:
        """Union of the peers' node definitions (None until a peer has answered)."""
        if self._merged is None:
            known = [p for p in self.peers() if p.object_info and not p.removed]
            if not known:
                return None
            self._merged = capability.merge_catalogs([p.object_info for p in known if p.object_info])
            self._swaps = replacements.merge(p.replacements for p in known)
        return self._merged

    def swaps(self) -> dict[str, list[dict]]:
        """The peers' node replacements as one map (GET /node_replacements)."""
        self.merged()
        return self._swaps

    async def complete(self) -> dict[str, dict]:
        """The cluster's nodes; asked of the peers when none has answered yet, but never
        for longer than ANSWER_WITHIN."""
        merged = self.merged()
        if merged is None:
            asking = [self.spawn(self.refresh(p)) for p in self.peers() if p.linked and not p.removed]
            if asking:
                await asyncio.wait(asking, timeout=ANSWER_WITHIN)
            merged = self.merged()
        return merged or {}

    async def refresh(self, peer: Peer) -> None:
        """What nodes and models the peer has, and which deprecated nodes it replaces."""
        try:
            info = await peer.get_json("/object_info", timeout=60)
        except PeerError as e:
            log.warning("peer %s: no /object_info: %s", peer.name, e)
            return
        problem = capability.object_info_problem(info)
        if problem is not None:  # its broken catalog must not break the cluster's
            log.warning("peer %s: /object_info ignored: %s", peer.name, problem)
            return
        info, malformed = capability.usable_classes(info)
        if malformed:
            log.warning("peer %s: %d node definition(s) in /object_info ignored as malformed: %s", peer.name,
                        len(malformed), ", ".join(map(str, malformed[:5])))
        try:  # ComfyUI before node replacements answers 404: it replaces nothing
            swaps = replacements.parse(await peer.get_json("/node_replacements", timeout=10, max_size=SMALL_BODY))
        except PeerError:
            swaps = {}
        if info != peer.object_info or swaps != peer.replacements:
            peer.object_info, peer.caps, peer.replacements = info, capability.Capabilities(info), swaps
            self._merged = None
            self.on_change()
