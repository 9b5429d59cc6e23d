from comfylb_ext.history import History
from comfylb_ext.tasks import Numbering, Task, TaskQueue


def task(pid, number):
    return Task(pid, number, {}, {"client_id": "c", "api_key_comfy_org": "secret"}, ["3"], client_id="c")


def test_numbering_follows_comfyui():
    n = Numbering()
    assert [n.assign(), n.assign(), n.assign(front=True), n.assign(number=7)] == [0, 1, -2, 7.0]
    assert n.assign() == 3  # an explicit number does not advance the counter


def test_queue_priority_front_and_removal():
    q = TaskQueue()
    for pid, number in [("a", 0), ("b", 1), ("c", -2), ("d", 1)]:
        q.push(task(pid, number))
    assert [t.prompt_id for t in q] == ["c", "a", "b", "d"]
    assert q.remove("a").prompt_id == "a"
    assert [t.prompt_id for t in q.ordered()] == ["c", "b", "d"]
    assert q.remove("c").prompt_id == "c" and next(q.ordered()).prompt_id == "b"
    q.remove("b")
    assert len(q) == 1 and "d" in q


def test_requeued_task_keeps_its_place():
    q = TaskQueue()
    first, second = task("a", 0), task("b", 1)
    q.push(first)
    q.push(second)
    assert q.remove("a") is first
    q.push(first, keep_seq=True)
    assert next(q.ordered()) is first


def test_queue_item_hides_credentials():
    item = task("a", 5).queue_item()
    assert item[:2] == [5, "a"] and item[3] == {"client_id": "c"} and item[4] == ["3"]


def entry(pid, n):
    return {"prompt": [n, pid, {}, {}, []], "outputs": {}, "status": {"status_str": "success"}, "meta": {}}


def test_history_numbers_in_completion_order():
    h = History()
    h.add("late", entry("late", 0))   # submitted first, finished first
    h.add("early", entry("early", 99))
    assert [e["prompt"][0] for e in h.items().values()] == [0, 1]


def test_history_paging_is_comfyuis():
    h = History()
    for i in range(5):
        h.add(f"p{i}", entry(f"p{i}", i))
    assert list(h.items(max_items=2)) == ["p3", "p4"]          # the last ones
    assert list(h.items(max_items=2, offset=1)) == ["p1", "p2"]
    assert list(h.items(offset=3)) == ["p3", "p4"]
    h.delete("p4")
    assert "p4" not in h and len(h) == 4
    h.clear()
    assert h.items() == {}


def test_history_is_bounded():
    h = History(max_size=3)
    for i in range(5):
        h.add(f"p{i}", entry(f"p{i}", i))
    assert list(h.items()) == ["p2", "p3", "p4"]
