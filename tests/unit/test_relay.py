import json
import struct

from comfylb_ext.relay import Relay, legacy_preview, parse_preview


class FakeHub:
    def __init__(self, flags):
        self.flags, self.sent = flags, []

    async def send_json(self, event, data, sid=None):
        self.sent.append(("json", event, sid))

    async def send_bytes(self, event, payload, sid=None):
        self.sent.append(("bytes", event, payload, sid))

    def client_flags(self, sid):
        return {"supports_preview_metadata": self.flags.get(sid, False)}

    def connected(self, sid):
        return sid not in self.away

    away = set()


def type4(meta, image=b"\x89PNGdata"):
    m = json.dumps(meta).encode()
    return struct.pack(">I", len(m)) + m + image


async def test_previews_follow_each_clients_flags():
    hub = FakeHub({"new": True, "old": False})
    relay = Relay(hub)
    payload = type4({"prompt_id": "p", "image_type": "image/png"})
    await relay.preview("new", payload)
    await relay.preview("old", payload)
    assert hub.sent[0] == ("bytes", 4, payload, "new")
    assert hub.sent[1] == ("bytes", 1, struct.pack(">I", 2) + b"\x89PNGdata", "old")


def test_jpeg_previews_keep_their_format():
    assert legacy_preview({"image_type": "image/jpeg"}, b"x")[:4] == struct.pack(">I", 1)
    assert parse_preview(b"\x00\x00") is None


async def test_prompts_without_client_only_broadcast_progress():
    hub = FakeHub({})
    relay = Relay(hub)
    for event in ("execution_start", "progress", "executed", "execution_interrupted"):
        await relay.json(None, event, {})
    assert [e for _, e, _ in hub.sent] == ["progress", "execution_interrupted"]


async def test_results_wait_for_a_client_that_is_away_and_reach_it_when_it_is_back():
    hub = FakeHub({})
    relay = Relay(hub)
    hub.away = {"c"}
    for event, data in (("progress", {"value": 1}), ("executed", {"output": {}}), ("execution_success", {}),
                        ("executing", {"node": None}), ("executing", {"node": "3"})):
        await relay.json("c", event, data)
    assert hub.sent == []
    hub.away = set()
    await relay.deliver_kept()
    assert [e for _, e, _ in hub.sent] == ["executed", "execution_success", "executing"]
    await relay.deliver_kept("c")
    assert len(hub.sent) == 3  # each once


async def test_results_just_sent_go_again_when_the_socket_they_went_through_died(monkeypatch):
    from comfylb_ext import mailbox

    hub = FakeHub({})
    relay = Relay(hub, ordered=False)
    clock = [1000.0]
    monkeypatch.setattr(mailbox.time, "monotonic", lambda: clock[0])
    await relay.json("c", "execution_success", {"prompt_id": "old"}, "old")
    clock[0] += 10  # long before the stand-by died: not sent again
    await relay.json("c", "progress", {"prompt_id": "p", "value": 1}, "p")
    await relay.json("c", "execution_success", {"prompt_id": "p"}, "p")
    await relay.json("c", "executing", {"prompt_id": "p", "node": None}, "p")
    await relay.json("other", "execution_success", {"prompt_id": "q"}, "q")
    hub.sent.clear()
    hub.away = {"c"}
    await relay.resend("c", relay.sent.since("c", 2.0))
    assert hub.sent == []  # away: kept until it is back
    hub.away = set()
    await relay.deliver_kept("c")
    assert hub.sent == [("json", "execution_success", "c"), ("json", "executing", "c")]  # its results only
