"""The state in PostgreSQL (storage.url), against a real server: the same store contract as
the embedded SQLite, a coordinator that keeps its queue and history across a restart, and
one clear line for each way the database cannot be used."""
from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest

from comfylb_ext.config import BackendConfig
from comfylb_ext.cost import Shape
from comfylb_ext.pgstore import SCHEMA_VERSION, PgStore, redacted
from comfylb_ext.store import Store, StoreError
from comfylb_ext.tasks import DONE, RUNNING, Task
from tests.client import Client, sleep_prompt
from tests.simcluster import sim_backends, start_balancer, wait_for

_names = itertools.count()


@pytest.fixture
def url(postgres):
    return postgres.database(f"t{next(_names)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """A function opening the same store again (a restart), for each kind of store."""
    if request.param == "sqlite":
        return lambda: Store(tmp_path / "state.db")
    target = request.getfixturevalue("url")
    return lambda: PgStore(target)


def task(n: int, **kw) -> Task:
    return Task(str(uuid.uuid4()), n, {"1": {"class_type": "X", "inputs": {"v": n}}}, {"k": "v"}, ["1"], **kw)


async def test_the_store_contract_holds_for_both_kinds(open_store):
    db = open_store()
    a, b = task(1, client_id="c1"), task(2)
    await db.add_task(a)
    await db.add_task(b)
    b.state, b.peer, b.attempts = RUNNING, "p0", 1
    db.update_task(b)
    a.state, a.finished_at = DONE, 1.5
    db.update_task(a)
    db.add_history(a.prompt_id, 0, {"prompt": [0, a.prompt_id, a.prompt, {}, ["1"]], "outputs": {}})
    db.save_peer(BackendConfig(name="rt", port=9999))
    db.save_peer(BackendConfig(name="rt", port=9998))  # replaced, not added
    db.set_files([("output", "", "a.png", "p0"), ("output", "", "a.png", "p1")])
    db.add_run(Shape(b"k" * 16, (1.0, 2.0)), 3.5)
    db.put("number", 7)
    db.close()

    db = open_store()  # as after a restart
    loaded = {t.prompt_id: t for t in db.load_tasks(finished=10)}
    assert loaded[b.prompt_id].state == RUNNING and loaded[b.prompt_id].peer == "p0"
    assert loaded[a.prompt_id].state == DONE and loaded[a.prompt_id].client_id == "c1"
    assert [(p, pos) for p, pos, _ in db.load_history()] == [(a.prompt_id, 0)]
    assert [(p.name, p.port) for p in db.load_peers()] == [("rt", 9998)]
    assert db.load_files() == {("output", "", "a.png"): "p1"}
    assert db.load_runs(keep=5) == [(Shape(b"k" * 16, (1.0, 2.0)), 3.5)]
    assert db.get("number") == 7 and db.get("absent", "d") == "d"
    db.delete_history([a.prompt_id])
    db.delete_task(b.prompt_id)
    assert db.load_history() == [] and [t.prompt_id for t in db.load_tasks(finished=10)] == [a.prompt_id]
    db.close()


async def test_a_coordinator_on_postgresql_keeps_its_queue_and_history_across_a_restart(url, tmp_path):
    from comfylb_ext.sim import start_sim

    sim = await start_sim(name="sim0")
    try:
        runner, cluster, lb = await start_balancer(sim_backends([sim]), str(tmp_path), storage={
            "dir": str(tmp_path), "url": url})
        await wait_for(lambda: all(p.available for p in cluster.peers.values()), cluster)
        async with Client(lb) as c:
            done = await c.run(sleep_prompt(0))
            waiting = [(await c.queue(sleep_prompt(0.3)))[1]["prompt_id"] for _ in range(3)]
        await runner.cleanup()

        runner, cluster, lb = await start_balancer(sim_backends([sim]), str(tmp_path), storage={
            "dir": str(tmp_path), "url": url})
        assert isinstance(cluster.db, PgStore)
        async with Client(lb) as c:
            for pid in waiting:
                c._track(pid)
            await wait_for(lambda: not set(waiting) & set(cluster.tasks), cluster, timeout=30)
            _, history = await c.get("/history")
            assert {done.prompt_id, *waiting} <= set(history)
            assert all(history[pid]["status"]["status_str"] == "success" for pid in waiting)
        await runner.cleanup()
    finally:
        await sim.stop()


def test_an_unreachable_database_is_one_clear_line(postgres):
    with pytest.raises(StoreError) as e:
        PgStore(f"postgresql://postgres:secret@127.0.0.1:{postgres.port + 1}/nowhere")
    message = str(e.value)
    assert "cannot be reached" in message and "storage.url" in message and "secret" not in message
    assert "\n" not in message


def test_a_schema_newer_than_the_code_is_refused(url):
    db = PgStore(url)
    db.put("schema_version", SCHEMA_VERSION + 1)  # as a later ComfyLB would leave it
    db.close()
    with pytest.raises(StoreError, match="newer than this ComfyLB"):
        PgStore(url)


async def test_one_coordinator_leads_and_the_next_takes_over_when_it_goes(url):
    from comfylb_ext.leadership import Leadership

    first = Leadership(url, "http://a:1")
    second = Leadership(url, "http://b:2")
    try:
        assert first.try_lead() and not second.try_lead()
        assert await second.leader() == "http://a:1" and await first.leader() is None  # a leader passes no one on
        waiting = asyncio.ensure_future(second.wait_to_lead())
        await asyncio.sleep(0)
        assert not waiting.done()
        first.close()  # its session ends: the lock is free at once
        await asyncio.wait_for(waiting, 10)
        assert second.leading
        third = Leadership(url, "http://c:3")
        assert await third.leader() == "http://b:2"
        third.close()
    finally:
        first.close()
        second.close()


async def test_stand_bys_are_told_of_a_new_leader_at_once(url):
    """A stand-by that looked the leader up a moment ago hears of the next one by NOTIFY,
    not when its look-up grows stale."""
    from comfylb_ext.leadership import Leadership

    first, second, standing = (Leadership(url, u) for u in ("http://a:1", "http://b:2", "http://c:3"))
    try:
        assert first.try_lead() and not second.try_lead()
        standing.listen()
        assert await standing.leader() == "http://a:1"  # looked up: kept for a while
        waiting = asyncio.ensure_future(second.wait_to_lead())
        first.close()
        await asyncio.wait_for(waiting, 10)
        assert await asyncio.to_thread(standing.heard.wait, 10)
        assert await standing.leader() == "http://b:2"
    finally:
        for one in (first, second, standing):
            one.close()


def test_the_password_never_reaches_a_log_line():
    assert redacted("postgresql://u:pw@h:5432/d") == "postgresql://u@h:5432/d"
    assert redacted("postgresql://h/d") == "postgresql://h/d"


async def test_state_written_while_the_database_was_away_is_written_again(url):
    from comfylb_ext.store import Snapshot

    db = PgStore(url)
    t = task(1)
    await db.add_task(t)
    db.db.close()  # the connection is lost under us
    t.state, t.peer = RUNNING, "p0"
    db.update_task(t)
    assert db.needs_rebuild() and db.problem
    db.rebuild(Snapshot(meta={"number": 3}, peers=[], tasks=[t], history=[], files={}, runs=[]))
    db.close()  # once every queued write, the rebuild included, has landed
    assert db.problem is None
    db = PgStore(url)
    [back] = db.load_tasks(finished=10)
    assert (back.prompt_id, back.state, back.peer) == (t.prompt_id, RUNNING, "p0") and db.get("number") == 3
    db.close()


async def test_uploads_kept_in_postgresql_reach_the_next_leaders_folder(url, tmp_path):
    """What one coordinator stored as an upload, the next one to lead writes into its own
    folder at start — only what it lacks or holds other bytes of."""
    from comfylb_ext.uploads import InputStore

    first = PgStore(url)
    old = InputStore(tmp_path / "old")
    pictures = {"a.png": b"first picture", "b.png": b"second picture"}
    for name, data in pictures.items():
        f = old.save(data, name, "sub")
        await first.save_input(f.key, f.sha256, data)
    first.close()

    second = PgStore(url)
    new = InputStore(tmp_path / "new")
    new.save(b"stale bytes", "b.png", "sub", overwrite=True)
    assert await asyncio.wrap_future(second.fetch_inputs(new.digest_of, new.put)) == 2
    for name, data in pictures.items():
        assert new.path_of(new.lookup("input", "sub", name)).read_bytes() == data
    assert await asyncio.wrap_future(second.fetch_inputs(new.digest_of, new.put)) == 0  # nothing lacking now
    second.close()


async def test_an_upload_the_database_did_not_take_is_not_acknowledged(url):
    """The server drops the store's session: keeping an upload raises, so the upload is
    answered 503 rather than 200 and then missing after a takeover."""
    from comfylb_ext.pgstore import connect

    store = PgStore(url)
    try:
        await store.save_input(("input", "", "kept.png"), "0" * 64, b"kept")
        with connect(url) as other:
            other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(StoreError):
            await store.save_input(("input", "", "lost.png"), "1" * 64, b"lost")
    finally:
        store.close()


def test_coordinators_started_together_all_open_the_new_database(url):
    """Several coordinators starting at once each make the schema: one at a time, so none
    fails on PostgreSQL's catalog (a ComfyUI coordinator did, and ran detached)."""
    from concurrent.futures import ThreadPoolExecutor

    from comfylb_ext.leadership import Leadership

    def open_one(i: int):
        return PgStore(url) if i % 2 else Leadership(url, f"http://c:{i}")
    with ThreadPoolExecutor(8) as pool:
        opened = list(pool.map(open_one, range(8)))  # raises if any could not
    assert len(opened) == 8
    for one in opened:
        one.close()
