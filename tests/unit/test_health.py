from comfylb_ext.config import HealthCheckConfig
from comfylb_ext.health import HealthState

CFG = HealthCheckConfig(interval=1, timeout=1, unhealthy_threshold=3, healthy_threshold=2)


def run(state, results):
    return [(state.record(ok, CFG, None if ok else "boom"), state.state) for ok in results]


def test_first_answer_decides_a_new_peer():
    assert run(HealthState(), [True]) == [(True, "healthy")]
    assert run(HealthState(), [False]) == [(True, "unhealthy")]


def test_no_flapping_either_way():
    s = HealthState()
    s.record(True, CFG)
    steps = run(s, [False, False, True, False, False, False, True, True])
    assert [st for _, st in steps] == ["healthy"] * 5 + ["unhealthy", "unhealthy", "healthy"]
    assert [changed for changed, _ in steps].count(True) == 2
    assert s.last_error == "boom"
