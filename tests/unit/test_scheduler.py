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
    for _ in range(30):
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


def test_affinity_prefers_the_warm_peer_but_never_over_an_idle_one():
    A, B = frozenset({"a.ckpt"}), frozenset({"b.ckpt"})
    state = SchedulerState("least_busy", prefer_idle=True)
    ps = [PeerView("cold", 0, 2, models=B), PeerView("warm", 0, 2, models=A)]
    assert pick(ps, state, A).name == "warm"
    busy_warm = [PeerView("cold", 0, 2, models=B), PeerView("warm", 1, 2, models=A)]
    assert pick(busy_warm, SchedulerState("least_busy", prefer_idle=False), A).name == "cold"
    assert pick(ps, SchedulerState("least_busy", affinity=False), A).name == "cold"  # plain: longest ago


def test_the_peer_whose_cache_holds_most_of_the_prompt_wins_among_equals():
    keys = frozenset({1, 2, 3})
    state = SchedulerState("least_busy", prefer_idle=True)
    ps = [PeerView("other", 0, 2, cached=frozenset({1})), PeerView("same", 0, 2, cached=keys, last_pick=5)]
    assert pick(ps, state, keys=keys).name == "same"  # though picked more recently
    busy_same = [PeerView("other", 0, 2, cached=frozenset({1})), PeerView("same", 1, 2, cached=keys)]
    assert pick(busy_same, state, keys=keys).name == "other"  # an idle peer still comes first
    assert pick(ps, SchedulerState("least_busy", affinity=False), keys=keys).name == "other"
    rr = SchedulerState("round_robin", prefer_idle=False)
    plain = [PeerView("a", 1, 2), PeerView("b", 0, 2)]
    assert pick(plain, rr, keys=keys).name == "a"  # nothing shared: the strategy alone decides


def test_idle_first_then_the_queue_that_empties_soonest():
    state = SchedulerState("least_busy", prefer_idle=False)
    idle_slow, busy_fast = PeerView("slow", 0, 4, job_time=4.0), PeerView("fast", 1, 4, job_time=1.0)
    assert pick([busy_fast, idle_slow], state).name == "slow"   # an idle GPU is never passed over
    fast, slow = PeerView("fast", 2, 4, job_time=1.0), PeerView("slow", 1, 4, job_time=4.0)
    assert pick([fast, slow], state).name == "fast"      # 3 x 1 s beats 2 x 4 s
    slowish = PeerView("slow", 1, 4, job_time=1.2)
    assert pick([fast, slowish], state).name == "slow"   # 2 x 1.2 s beats 3 x 1 s
