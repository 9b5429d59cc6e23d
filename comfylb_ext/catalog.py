"""The cluster's node catalog: every peer's `/object_info` merged, the node
replacements today's ComfyUI peers declare, and each peer's model listings (for the
inventory).  A peer's malformed catalog is its own problem (logged and ignored), never
the cluster's."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Coroutine, Iterable
from urllib.parse import quote

from . import capability, inventory, replacements
from .peer import SMALL_BODY, Peer, PeerError

log = logging.getLogger(__name__)

ANSWER_WITHIN = 5.0   # seconds a request waits for peers' answers (the newest web UI gives up after 60)
# Model listings (GET /models, /models/{folder}) are asked only when someone reads the
# inventory, and kept until the peer's /object_info changes (it lists the same files) or
# for MODELS_FRESH seconds, whichever comes first: no polling.
MODELS_FRESH = 60.0
FOLDERS_WITHIN = 8.0  # seconds for all of a peer's folder listings together
FOLDER_BODY = 4 << 20  # a folder's list of file names (~40,000 names)
FOLDERS_AT_ONCE = 4


class Catalog:
    def __init__(self, peers: Callable[[], Iterable[Peer]], spawn: Callable[[Coroutine[Any, Any, Any]], Any],
                 on_change: Callable[[], None]) -> None:
        self.peers = peers
        self.spawn = spawn
        self.on_change = on_change  # what a peer offers changed: prompts waiting for it may go
        self._merged: dict[str, dict] | None = None
        self._swaps: dict[str, list[dict]] = {}
        # peer name → (the peer, its object_info then, when, its listings)
        self._listed: dict[str, tuple[Peer, Any, float, dict[str, Any] | None]] = {}
        self._listing: dict[str, asyncio.Lock] = {}

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

    async def model_listings(self, peer: Peer) -> dict[str, Any] | None:
        """The peer's model listings, {folder: its /models/{folder} answer, None where it
        could not be read} (None: no answer to /models), as inventory.inventory() takes
        them.  A peer whose link is down is not asked: its last listings stand."""
        known = set(self._listed) | set(self._listing)
        for name in known - {p.name for p in self.peers() if not p.removed}:  # removed peers
            self._listed.pop(name, None)
            self._listing.pop(name, None)
        async with self._listing.setdefault(peer.name, asyncio.Lock()):  # one asking at a time
            cached = self._listed.get(peer.name)
            if cached is not None and cached[0] is peer and (not peer.linked or (
                    cached[1] is peer.object_info and time.monotonic() - cached[2] < MODELS_FRESH)):
                return cached[3]
            if not peer.linked:
                return None
            listings = await _list_models(peer)
            self._listed[peer.name] = (peer, peer.object_info, time.monotonic(), listings)
            return listings


async def _list_models(peer: Peer) -> dict[str, Any] | None:
    """Ask a peer for its model folders, then each folder's files (a few at a time, all
    within FOLDERS_WITHIN: a folder that takes longer counts as not read)."""
    try:
        folders = inventory.folder_names(await peer.get_json("/models", timeout=ANSWER_WITHIN, max_size=SMALL_BODY))
    except PeerError as e:
        log.info("peer %s: no model list: %s", peer.name, e)
        return None
    if folders is None:
        log.warning("peer %s: GET /models is not a list of folders: ignored", peer.name)
        return None
    gate = asyncio.Semaphore(FOLDERS_AT_ONCE)

    async def files(folder: str) -> Any:
        async with gate:
            return await peer.get_json("/models/" + quote(folder, safe=""), timeout=ANSWER_WITHIN,
                                       max_size=FOLDER_BODY)
    asking = {folder: asyncio.ensure_future(files(folder)) for folder in folders}
    try:
        if asking:
            await asyncio.wait(asking.values(), timeout=FOLDERS_WITHIN)
    finally:
        for task in asking.values():
            task.cancel()  # a folder still unanswered counts as not read
        await asyncio.gather(*asking.values(), return_exceptions=True)
    listings: dict[str, Any] = {}
    for folder, task in asking.items():
        failed = task.cancelled() or task.exception()
        if failed:
            log.info("peer %s: model folder %r not read: %s", peer.name, folder,
                     "no answer in time" if task.cancelled() else failed)
        listings[folder] = None if failed else task.result()
    return listings
