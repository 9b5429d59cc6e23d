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
        await _waits_for_the_lock(url, 1)  # in PostgreSQL's queue for it, not finished
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


async def _waits_for_the_lock(url: str, n: int) -> None:
    """Until `n` sessions wait for the leader's lock (PostgreSQL says nothing when one
    starts to: its pg_locks is read until then)."""
    from comfylb_ext.leadership import LOCK_KEY
    from comfylb_ext.pgstore import connect

    with connect(url) as db:
        for _ in range(200):
            waiting = db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND "
                                 "((classid::bigint << 32) | objid::bigint) = %s", (LOCK_KEY,)).fetchone()[0]
            if waiting == n:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{n} session(s) never waited for the lock")


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


async def test_a_rebuild_of_the_state_keeps_the_leaders_address(url):
    """The leader writes its whole state again after the database was away: stand-bys (and
    coordinators starting later) still find it."""
    from comfylb_ext.leadership import Leadership
    from comfylb_ext.store import Snapshot

    lead, other = Leadership(url, "http://a:1"), Leadership(url, "http://b:2")
    db = PgStore(url)
    try:
        assert lead.try_lead()
        db.db.close()
        db.put("number", 1)  # fails: the state is to be written again
        assert db.needs_rebuild()
        db.rebuild(Snapshot(meta={"number": 3}, peers=[], tasks=[], history=[], files={}, runs=[]))
        db.close()
        assert db.problem is None
        assert await other.leader() == "http://a:1"
        assert PgStore(url).get("number") == 3
    finally:
        for one in (lead, other):
            one.close()


@pytest.mark.parametrize("announced", ["", "not a url", "ftp://a:1/", "javascript:alert(1)", "http://a:99999/",
                                       "http:///nohost", 7, None])
async def test_an_address_someone_broke_is_no_leader(url, announced):
    """The leader's row, or a NOTIFY, that is not an http(s) URL: stand-bys answer 503 (no
    leader) rather than pass clients on to it."""
    import json

    from comfylb_ext.leadership import CHANNEL, Leadership
    from comfylb_ext.pgstore import connect

    lead, standing = Leadership(url, "http://a:1"), Leadership(url, "http://c:3")
    try:
        assert lead.try_lead()
        with connect(url) as db:
            db.execute("UPDATE meta SET value = %s WHERE key = 'leader'", (json.dumps({"url": announced}),))
        assert await standing.leader() is None
        standing.listen()
        with connect(url) as db:
            db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(announced)))
        assert await asyncio.to_thread(standing.heard.wait, 10)
        assert await standing.leader() is None
    finally:
        for one in (lead, standing):
            one.close()


async def test_a_leader_that_closes_has_not_lost_its_lead(url, monkeypatch):
    """Closing (at shutdown) ends the leader's watch quietly: `lost` is for a session that
    went away under it."""
    import threading

    from comfylb_ext import leadership

    monkeypatch.setattr(leadership, "CHECK_EVERY", 0.05)
    lead = leadership.Leadership(url, "http://a:1")
    assert lead.try_lead()
    lost = threading.Event()
    watching = lead.watch(lost.set)
    lead.close()
    watching.join(5)
    assert not watching.is_alive() and not lost.is_set()


async def test_a_leader_whose_session_is_dropped_is_told_so(url, monkeypatch):
    import threading

    from comfylb_ext import leadership
    from comfylb_ext.pgstore import connect

    monkeypatch.setattr(leadership, "CHECK_EVERY", 0.05)
    lead = leadership.Leadership(url, "http://a:1")
    try:
        assert lead.try_lead()
        lost = threading.Event()
        lead.watch(lost.set)
        holder = lead._holder.info.backend_pid
        with connect(url) as db:
            db.execute("SELECT pg_terminate_backend(%s)", (holder,))
        assert await asyncio.to_thread(lost.wait, 10) and not lead.leading
    finally:
        lead.close()


async def test_requests_arriving_together_share_one_look_up(url, monkeypatch):
    from comfylb_ext.leadership import Leadership

    lead, standing = Leadership(url, "http://a:1"), Leadership(url, "http://c:3")
    try:
        assert lead.try_lead()
        looks = []
        real = standing._look_up
        monkeypatch.setattr(standing, "_look_up", lambda: looks.append(1) or real())
        assert await asyncio.gather(*(standing.leader() for _ in range(50))) == ["http://a:1"] * 50
        assert len(looks) == 1
    finally:
        for one in (lead, standing):
            one.close()


async def test_an_input_row_someone_broke_writes_nothing_outside_the_folder(url, tmp_path):
    """Rows naming a path out of storage.dir, or a type ComfyUI has not, are skipped (and
    said); the good one still lands."""
    from comfylb_ext.uploads import InputStore

    store = PgStore(url)
    try:
        for key in (("input", "../..", "escaped.png"), ("input", "", "../escaped.png"), ("bogus", "", "x.png"),
                    ("input", "", "good.png")):
            await store.save_input(key, "0" * 64, b"bytes")
        files = InputStore(tmp_path / "files")
        assert await asyncio.wrap_future(store.fetch_inputs(files.digest_of, files.put)) == 4
    finally:
        store.close()
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == \
        ["files/input/good.png"]
