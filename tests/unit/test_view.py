"""Where a /view's file comes from (outputs.find_view), case by case, without HTTP."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from comfylb_ext.outputs import (HostsOwn, OnDisk, Outputs, Refused, Relayed, Unreachable, ViewCache, find_view,
                                 view_target)
from comfylb_ext.peer import PeerError
from comfylb_ext.uploads import InputStore


class NoFiles:
    """The state database, holding no file locations."""

    def load_files(self) -> dict:
        return {}

    def set_files(self, rows) -> None:
        pass


@dataclass
class FakePeer:
    name: str
    delivered: list = field(default_factory=list)

    async def open_stream(self, method: str, path: str, **kw):
        raise PeerError(f"{self.name} is down")

    async def deliver(self, stored, path) -> None:
        self.delivered.append(stored.filename)


def outputs(cache_root=None) -> Outputs:
    return Outputs(NoFiles(), ViewCache(cache_root, 1 << 20), 1 << 20, False, spawn=None, changed=lambda: None)


async def view(out: Outputs, inputs: InputStore, query: dict, holder=None, converter=None, own_files=False):
    return await find_view(out, inputs, query, producer_of=lambda typ, sub, name: holder,
                           any_peer=lambda: converter, own_files=own_files)


@pytest.mark.parametrize("query,refused", [
    ({}, Refused(404)),
    ({"filename": ""}, Refused(400)),
    ({"filename": "/etc/passwd"}, Refused(400)),
    ({"filename": "../a.png"}, Refused(400)),
    ({"filename": "a.png", "type": "secret"}, Refused(400)),
    ({"filename": "a.png", "subfolder": "../up"}, Refused(403)),
])
def test_a_query_naming_nothing_servable_is_refused_as_comfyui_refuses_it(query, refused):
    assert view_target(query) == refused


def test_an_annotated_name_says_its_type():
    assert view_target({"filename": "sub/a.png [input]", "subfolder": "s"}) == ("input", "s", "a.png")


async def test_each_source_of_a_file(tmp_path):
    inputs = InputStore(tmp_path / "files")
    inputs.save(b"png", "in.png")
    peer = FakePeer("p1")
    out = outputs(tmp_path / "cache")
    out.own = "local"
    assert await view(out, inputs, {"filename": "a.png"}, holder=FakePeer("local")) == HostsOwn()
    out.cache.put("p1", "a.png", [b"copy"])
    found = await view(out, inputs, {"filename": "a.png", "subfolder": "p1"}, holder=peer)
    assert found == OnDisk(out.cache.get("p1", "a.png"), "a.png")
    found = await view(out, inputs, {"filename": "b.png", "subfolder": "p1"}, holder=peer)
    assert isinstance(found, Unreachable) and found.peer is peer and str(found.error) == "p1 is down"
    assert out.copies.inflight == {}  # the copy it started was given up with the peer
    # a preview is never copied: the peer converts its own file
    assert await view(out, inputs, {"filename": "b.png", "preview": "webp"}, holder=peer) == Relayed(peer)
    assert await view(outputs(), inputs, {"filename": "b.png"}, holder=peer) == Relayed(peer)  # no cache
    assert await view(out, inputs, {"filename": "in.png", "type": "input"}) == OnDisk(
        inputs.path_of(inputs.lookup("input", "", "in.png")), "in.png")
    assert await view(out, inputs, {"filename": "none.png", "type": "input"}) == Refused(404)
    assert await view(out, inputs, {"filename": "none.png", "type": "input"}, own_files=True) == HostsOwn()


async def test_a_converted_view_of_an_input_is_a_peers_work(tmp_path):
    inputs = InputStore(tmp_path / "files")
    inputs.save(b"png", "in.png")
    query = {"filename": "in.png", "type": "input", "channel": "a"}
    assert await view(outputs(), inputs, query) == Refused(503, "no peer available to convert the image")
    converter = FakePeer("p2")
    assert await view(outputs(), inputs, query, converter=converter) == Relayed(converter)
    assert converter.delivered == ["in.png"]
