"""A job polled by id (history, then queue) is listed somewhere at every read."""
from comfylb_ext.polls import Polls


def test_a_polled_job_lingers_in_the_queue_until_its_history_is_read():
    p = Polls()
    p.missed("a")            # /history/a while it ran
    p.ended("a", "task-a")   # it ended before /queue was read
    p.ended("b", "task-b")   # nobody polled b
    assert p.lingering() == ["task-a"]
    p.forget("a")            # /history/a found it
    assert p.lingering() == []


def test_lingering_ends_after_its_time():
    p = Polls(linger=0.0)
    p.missed("a")
    p.ended("a", "task-a")
    assert p.lingering() == []
