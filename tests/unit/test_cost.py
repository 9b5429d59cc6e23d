"""The cost model and longest-first ordering, with plain data."""
from comfylb_ext.cost import CostModel, shape
from comfylb_ext.scheduler import longest_first


def sampler(steps: int, seed: int, width: int = 512, sampler_name: str = "euler") -> dict:
    return {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": 512, "batch_size": 1}},
            "2": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 7.0,
                                                       "sampler_name": sampler_name, "latent_image": ["1", 0]}}}


def test_seeds_do_not_change_a_prompts_shape_but_other_inputs_do():
    assert shape(sampler(20, 1)) == shape(sampler(20, 99))
    assert shape(sampler(20, 1)).key == shape(sampler(30, 1)).key  # same workflow, other numbers
    assert shape(sampler(20, 1)).features != shape(sampler(30, 1)).features
    assert shape(sampler(20, 1)).key != shape(sampler(20, 1, sampler_name="dpmpp_2m")).key
    assert shape({"1": "not a node", "2": {"inputs": None}}).features == ()  # malformed: no crash


def test_unknown_workflows_have_no_prediction_and_known_ones_follow_their_numbers():
    model = CostModel()
    assert model.predict(shape(sampler(20, 1))) is None
    model.observe(shape(sampler(20, 1)), 4.0)
    assert model.predict(shape(sampler(40, 2))) == 4.0  # one run: all it knows
    model.observe(shape(sampler(10, 3)), 2.0)
    assert model.predict(shape(sampler(40, 4))) == 3.0  # two runs cannot say which number matters
    model.observe(shape(sampler(30, 3)), 6.0)
    assert abs(model.predict(shape(sampler(40, 4))) - 8.0) < 1e-3  # steps explain the time
    model.observe(shape(sampler(10, 5, width=1024)), 4.0)
    assert model.predict(shape(sampler(20, 6, width=1024))) == 4.0  # a second number varies: the mean, for now
    model.observe(shape(sampler(30, 5, width=1024)), 8.0)
    assert abs(model.predict(shape(sampler(20, 6, width=1024))) - 6.0) < 1e-3
    assert model.predict(shape(sampler(20, 7, sampler_name="dpmpp_2m"))) is None
    assert model.predict(shape(sampler(0, 8))) >= 0.0  # never negative


def test_longest_first_keeps_front_and_overtaken_prompts_in_queue_order():
    # (number, predicted seconds, times overtaken), in queue order
    assert longest_first([(1, 1.0, 0), (2, 3.0, 0), (3, 2.0, 0)], limit=5) == [1, 2, 0]
    assert longest_first([(1, 1.0, 0), (-1, 0.5, 0), (3, 2.0, 0)], limit=5) == [1, 2, 0]  # queued at the front
    assert longest_first([(1, 1.0, 5), (2, 3.0, 0), (3, 2.0, 0)], limit=5) == [0, 1, 2]  # waited long enough
    assert longest_first([(1, None, 0), (2, 3.0, 0), (3, 1.0, 0)], limit=5) == [1, 0, 2]  # unknown: typical (2 s)
    assert longest_first([(1, None, 0), (2, None, 0)], limit=5) == [0, 1]  # nothing known: queue order


def test_a_number_that_varies_at_random_does_not_fool_a_short_history():
    def sleep(seconds: float, colour: int) -> dict:
        return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "color": colour}},
                "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}}}
    model = CostModel()
    runs = ((0.5, 9_000_000), (1.5, 120), (1.0, 4_000_000), (0.8, 11_000_000), (1.2, 77))
    for seconds, colour in runs[:4]:
        model.observe(shape(sleep(seconds, colour)), seconds)
    assert model.predict(shape(sleep(1.2, 16_000_000))) == 0.95  # four runs, two numbers: the mean
    model.observe(shape(sleep(*runs[4])), runs[4][0])
    assert abs(model.predict(shape(sleep(1.3, 16_000_000))) - 1.3) < 1e-3


def test_what_was_learnt_survives_a_restart(tmp_path):
    from comfylb_ext.store import Store

    store = Store(tmp_path / "state.db")
    for steps, seconds in ((10, 2.0), (20, 4.0), (30, 6.0), (40, 8.0)):
        store.add_run(shape(sampler(steps, steps)), seconds)
    store.close()
    model = CostModel()
    for s, seconds in Store(tmp_path / "state.db").load_runs(keep=3):  # the oldest is let go
        model.observe(s, seconds)
    assert abs(model.predict(shape(sampler(50, 1))) - 10.0) < 1e-3
    assert len(Store(tmp_path / "state.db").load_runs(keep=3)) == 3


def test_a_peers_pace_is_its_run_times_over_the_predictions():
    from comfylb_ext.config import BackendConfig
    from comfylb_ext.peer import Peer

    slow = Peer(BackendConfig(name="slow"), session=None, client_id="c", listener=None)
    slow.record_job(2.0)  # nothing predicted yet: no pace
    assert slow.pace is None
    for _ in range(20):
        slow.record_job(4.0, predicted=1.0)
    assert abs(slow.pace - 4.0) < 1e-9 and abs(slow.job_time - 4.0) < 0.01

