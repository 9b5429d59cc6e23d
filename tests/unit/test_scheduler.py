import pytest

from comfylb_ext.scheduler import PeerView, SchedulerState, pick


def peers(*specs):
    return [PeerView(name, inflight, max_queue, weight, available, last)
            for name, inflight, max_queue, weight, available, last in specs]


def test_least_busy_picks_the_emptiest_and_rotates_ties():
    ps = peers(("a", 1, 4, 1, True, 0), ("b", 0, 4, 1, True, 1), ("c", 0, 4, 1, True, 2))
    assert pick(ps, SchedulerState("least_busy", prefer_idle=False)).name == "b"  # picked longest ago


def test_full_unavailable_and_none():
    ps = peers(("a", 2, 2, 1, True, -1), ("b", 0, 2, 1, False, -1))
    assert pick(ps, SchedulerState()) is None
    assert pick([], SchedulerState()) is None


def test_prefer_idle_beats_weight():
    ps = peers(("big", 1, 4, 10, True, -1), ("small", 0, 4, 1, True, -1))
    assert pick(ps, SchedulerState("weighted", prefer_idle=True)).name == "small"
    assert pick(ps, SchedulerState("weighted", prefer_idle=False)).name == "big"


def test_weighted_fills_in_proportion_to_weight():
    load = {"a": 0, "b": 0}
    state = SchedulerState("weighted", prefer_idle=False)
    for i in range(30):
        ps = peers(("a", load["a"], 100, 2, True, -1), ("b", load["b"], 100, 1, True, -1))
        load[pick(ps, state).name] += 1
    assert load == {"a": 20, "b": 10}


def test_round_robin_cycles_and_skips_peers_without_room():
    state = SchedulerState("round_robin", prefer_idle=False)
    ps = peers(("a", 0, 9, 1, True, -1), ("b", 0, 9, 1, True, -1), ("c", 0, 9, 1, True, -1))
    assert [pick(ps, state).name for _ in range(4)] == ["a", "b", "c", "a"]
    ps = peers(("a", 0, 9, 1, True, -1), ("b", 9, 9, 1, True, -1), ("c", 0, 9, 1, False, -1))
    assert [pick(ps, state).name for _ in range(2)] == ["a", "a"]


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError):
        pick(peers(("a", 0, 1, 1, True, -1)), SchedulerState("fastest"))
