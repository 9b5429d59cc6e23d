"""Copies of outputs: the disk cache's bound, and readers following a copy in flight."""
import asyncio

from comfylb_ext.outputs import Copy, ViewCache


def test_cache_keeps_the_newest_within_its_bound(tmp_path):
    cache = ViewCache(tmp_path, limit_bytes=10)
    cache.put("p", "a.png", [b"1234", b"56"])
    cache.put("p", "b.png", [b"123456"])  # 12 bytes > 10: the oldest goes
    assert cache.get("p", "a.png") is None
    assert cache.get("p", "b.png").read_bytes() == b"123456"
    cache.put("..", "escape.png", [b"x"])  # outside the cache: refused
    assert not (tmp_path.parent / "escape.png").exists()
    cache.invalidate("p", "b.png")
    assert cache.get("p", "b.png") is None and cache.total == 0


async def collect(copy: Copy) -> list[bytes]:
    return [c async for c in copy.read()]


async def test_a_reader_that_joins_late_gets_every_chunk_in_order():
    copy = Copy(("p", "a.png"))
    early = copy.read()
    copy.add(b"one")
    assert await early.__anext__() == b"one"
    late = asyncio.create_task(collect(copy))  # joins after the first chunk was passed on
    waiting = asyncio.create_task(early.__anext__())  # the early reader waits for more
    copy.add(b"two")
    copy.finish(True)
    assert await waiting == b"two"
    assert await late == [b"one", b"two"]
    assert [c async for c in early] == []


async def test_readers_stop_where_the_peer_broke_off_and_opened_says_so():
    copy = Copy(("p", "a.png"))
    reader = asyncio.create_task(collect(copy))
    waiting = asyncio.create_task(copy.opened())
    copy.add(b"part")
    copy.finish(False)
    assert await reader == [b"part"] and not copy.ok
    assert await waiting is False  # never answered: followers ask the peer themselves
