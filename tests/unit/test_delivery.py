"""Ordered delivery: each client sees one prompt's messages at a time, in queue order."""
from comfylb_ext.delivery import HELD_MAX, Delivery


class Socket:
    def __init__(self):
        self.got = []

    def sender(self, pid, event):
        async def send():
            self.got.append((pid, event))
        return send


async def say(d, sock, client, pid, *events):
    for e in events:
        await d.send(client, pid, sock.sender(pid, e))


async def test_a_later_prompt_is_held_until_the_earlier_one_ends():
    d, sock = Delivery(), Socket()
    d.expect("c", "A", (0, 0))
    d.expect("c", "B", (1, 1))
    await say(d, sock, "c", "B", "start", "success")   # B ran first, on another peer
    await say(d, sock, "c", "A", "start")
    assert sock.got == [("A", "start")]
    await d.end("c", "B")                               # B ended while held: nothing yet
    assert sock.got == [("A", "start")]
    await say(d, sock, "c", "A", "success")
    await d.end("c", "A")
    assert sock.got == [("A", "start"), ("A", "success"), ("B", "start"), ("B", "success")]
    assert d.held("c") == 0


async def test_the_next_prompt_goes_live_once_its_turn_comes():
    d, sock = Delivery(), Socket()
    for i, pid in enumerate("ABC"):
        d.expect("c", pid, (i, i))
    await say(d, sock, "c", "A", "start")
    await say(d, sock, "c", "B", "start")
    await d.end("c", "A")
    await say(d, sock, "c", "B", "progress")            # B is current now: live
    await say(d, sock, "c", "C", "start")               # C waits for B
    assert sock.got == [("A", "start"), ("B", "start"), ("B", "progress")]
    await d.end("c", "B")
    assert sock.got[-1] == ("C", "start")


async def test_a_prompt_deleted_before_it_spoke_does_not_block_the_rest():
    d, sock = Delivery(), Socket()
    d.expect("c", "A", (0, 0))
    d.expect("c", "B", (1, 1))
    await say(d, sock, "c", "B", "start")
    assert sock.got == []
    await d.end("c", "A")                               # A was dequeued silently
    assert sock.got == [("B", "start")]


async def test_front_of_queue_prompt_takes_its_place_but_never_preempts_the_current_one():
    d, sock = Delivery(), Socket()
    d.expect("c", "A", (5, 0))
    d.expect("c", "B", (6, 1))
    await say(d, sock, "c", "A", "start")
    d.expect("c", "F", (-1, 2))                         # queued with front=True
    await say(d, sock, "c", "F", "start")
    await say(d, sock, "c", "B", "start")
    assert sock.got == [("A", "start")]
    await d.end("c", "A")
    assert sock.got == [("A", "start"), ("F", "start")]
    await d.end("c", "F")
    assert sock.got[-1] == ("B", "start")


async def test_other_clients_and_interleaving_clients_are_not_held():
    d, sock = Delivery(), Socket()
    d.expect("c", "A", (0, 0))
    d.expect("c", "B", (1, 1))
    d.expect("x", "X", (2, 2))
    await say(d, sock, "x", "X", "start")
    await d.send("c", "B", sock.sender("B", "start"), interleave=True)
    assert sock.got == [("X", "start"), ("B", "start")]


async def test_off_delivers_everything_live():
    d, sock = Delivery(ordered=False), Socket()
    d.expect("c", "A", (0, 0))
    d.expect("c", "B", (1, 1))
    await say(d, sock, "c", "B", "start")
    assert sock.got == [("B", "start")]


async def test_too_much_held_goes_live_rather_than_growing_without_bound():
    d, sock = Delivery(), Socket()
    d.expect("c", "A", (0, 0))
    d.expect("c", "B", (1, 1))
    await say(d, sock, "c", "A", "start")
    for _ in range(HELD_MAX + 1):
        await say(d, sock, "c", "B", "progress")
    assert len(sock.got) == HELD_MAX + 2 and d.held("c") == 0
