"""The state database under trouble, and results for clients that were away."""
from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import subprocess
import sys

import pytest

from comfylb_ext import dispatcher
from comfylb_ext.sim import start_sim
from tests.client import Client, sleep_prompt
from tests.simcluster import sim_backends, start_balancer, wait_for


@contextlib.asynccontextmanager
async def coordinator(tmp_path, sims, **sections):
    runner, cluster, url = await start_balancer(sim_backends(sims), str(tmp_path),
                                                **{"health_check": {"interval": 0.5, "timeout": 1.0}, **sections})
    try:
        await wait_for(lambda: all(p.available for p in cluster.peers.values()), cluster)
        yield cluster, url
    finally:
        await runner.cleanup()


@pytest.fixture
async def sims():
    started = [await start_sim(name=f"sim{i}") for i in range(2)]
    yield started
    for s in started:
        await s.stop()


@pytest.fixture(autouse=True)
def quick_checks(monkeypatch):
    monkeypatch.setattr(dispatcher, "STORE_CHECK_EVERY", 0.05)


async def test_a_deleted_database_is_written_again_and_nothing_acknowledged_is_lost(tmp_path, sims):
    db = tmp_path / "comfylb.db"
    async with coordinator(tmp_path, sims) as (cluster, url):
        async with Client(url) as c:
            before = [(await c.queue(sleep_prompt(30)))[1]["prompt_id"] for _ in range(3)]
            os.unlink(db)
            after = [(await c.queue(sleep_prompt(30)))[1]["prompt_id"] for _ in range(3)]
            await wait_for(lambda: db.exists() and not cluster.db.problem, cluster)
            assert cluster.stats()["storage"] == {"ok": True, "problem": None}
            await c.post("/interrupt", {})
    async with coordinator(tmp_path, sims) as (cluster, url):
        assert set(before + after) <= set(cluster.record)


async def test_a_full_disk_refuses_new_prompts_clearly_and_recovers_when_space_returns(tmp_path, sims):
    async with coordinator(tmp_path, sims) as (cluster, url):
        async with Client(url) as c:
            kept = (await c.queue(sleep_prompt(30)))[1]["prompt_id"]
            pages = cluster.db.db.execute("PRAGMA page_count").fetchone()[0]
            cluster.db.db.execute(f"PRAGMA max_page_count={pages}")  # as a disk with no room left
            big = sleep_prompt(30)
            big["1"]["_meta"] = {"title": "x" * 100000}
            status, body, _ = await c.queue(big)
            assert status == 503 and body["error"]["type"] == "storage_unavailable", body
            _, queue = await c.get("/queue")
            assert [item[1] for item in queue["queue_running"] + queue["queue_pending"]] == [kept]  # no phantom
            await wait_for(lambda: not cluster.db.problem, cluster)  # the rebuilt file has room
            status, body, _ = await c.queue(sleep_prompt(30))
            assert status == 200
            later = body["prompt_id"]
            await c.post("/queue", {"clear": True})
            await c.post("/interrupt", {})
    with sqlite3.connect(tmp_path / "comfylb.db") as con:
        ids = {row[0] for row in con.execute("SELECT prompt_id FROM tasks")}
    assert {kept, later} <= ids


def test_an_unreadable_database_stops_the_balancer_with_one_line(tmp_path):
    (tmp_path / "comfylb.db").write_bytes(b"this is not a database" * 100)
    config = tmp_path / "c.yaml"
    config.write_text(f"storage: {{dir: {tmp_path}}}\n")
    out = subprocess.run([sys.executable, "-m", "comfylb_ext", "-c", str(config)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("comfylb: state error:"), out.stderr
    assert "Traceback" not in out.stderr and "move it away" in out.stderr


async def test_the_database_is_private_and_finished_tasks_keep_no_keys(tmp_path, sims):
    async with coordinator(tmp_path, sims) as (cluster, url):
        async with Client(url) as c:
            run = await c.run(sleep_prompt(0.01), extra_data={"api_key_comfy_org": "secret-key"})
            assert "execution_success" in run.types()
            assert stat.S_IMODE(os.stat(tmp_path / "comfylb.db").st_mode) == 0o600
            await wait_for(lambda: not cluster.tasks, cluster)
            assert "api_key_comfy_org" not in cluster.record[run.prompt_id].extra_data
    assert b"secret-key" not in (tmp_path / "comfylb.db").read_bytes()
    with sqlite3.connect(tmp_path / "comfylb.db") as con:
        (body,) = con.execute("SELECT body FROM tasks WHERE prompt_id=?", (run.prompt_id,)).fetchone()
    assert "secret-key" not in body


async def test_any_row_in_the_database_loads(tmp_path, sims):
    async with coordinator(tmp_path, sims) as (cluster, url):
        async with Client(url) as c:
            run = await c.run(sleep_prompt(0.01))
    deep = "[" * 5000 + "]" * 5000
    with sqlite3.connect(tmp_path / "comfylb.db") as con:
        con.execute("INSERT INTO history VALUES ('deep', 999, ?)", (deep,))
        con.execute("INSERT INTO history VALUES ('junk', 1000, 'not json')")
        con.execute("INSERT INTO tasks (prompt_id, body, state, created) VALUES ('x', ?, 'queued', 0)", (deep,))
    async with coordinator(tmp_path, sims) as (cluster, url):
        async with Client(url) as c:
            status, hist = await c.get("/history")
            assert status == 200 and run.prompt_id in hist and "deep" not in hist


async def test_results_that_came_while_the_client_was_away_reach_it_when_it_is_back(tmp_path, sims):
    async with coordinator(tmp_path, sims) as (cluster, url):
        async with Client(url) as c:
            client_id = c.client_id
            ids = [(await c.queue(sleep_prompt(0.3)))[1]["prompt_id"] for _ in range(3)]
        await wait_for(lambda: not cluster.tasks, cluster)  # all ended while nobody listened
        async with Client(url, client_id=client_id) as c:
            runs = [c._track(pid) for pid in ids]
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in runs)), 10)
            assert all("execution_success" in r.types() for r in runs)


async def test_a_tasks_changing_state_never_rewrites_its_prompt(tmp_path, sims):
    """SQLite rewrites a whole row at every update: the prompt (up to 32 MB) is written once."""
    async with coordinator(tmp_path, sims) as (cluster, url):
        async with Client(url) as c:
            run = await c.run(sleep_prompt(0.01))
    with sqlite3.connect(tmp_path / "comfylb.db") as con:
        (first,) = con.execute("SELECT state FROM tasks WHERE prompt_id=?", (run.prompt_id,)).fetchone()
        (now,) = con.execute("SELECT state FROM task_state WHERE prompt_id=?", (run.prompt_id,)).fetchone()
    assert (first, now) == ("queued", "done")
    async with coordinator(tmp_path, sims) as (cluster, url):
        assert cluster.record[run.prompt_id].state == "done"


async def test_runtime_peers_come_back_unless_the_config_says_otherwise(tmp_path, sims):
    async with coordinator(tmp_path, sims[:1]) as (cluster, url):
        async with Client(url) as c:
            status, _ = await c.post("/lb/backends", {"name": "added", "host": "127.0.0.1", "port": sims[1].port})
            assert status == 201
    async with coordinator(tmp_path, sims[:1]) as (cluster, url):
        assert cluster.peers["added"].source == "runtime"
    async with coordinator(tmp_path, sims[:1], storage={"dir": str(tmp_path), "keep_runtime_peers": False}) as (
            cluster, url):
        assert set(cluster.peers) == {"sim0"}
    async with coordinator(tmp_path, sims[:1]) as (cluster, url):
        assert set(cluster.peers) == {"sim0"}  # forgotten for good


def test_writes_keep_their_order_across_the_database_thread(tmp_path):
    """Large writes go to the database's thread; a small one asked after them must not
    overtake them by running at once."""
    from comfylb_ext.store import Store

    db = Store(tmp_path / "order.db")
    for i in range(20):
        db.add_history(f"big{i}", i, {"prompt": [i, f"big{i}", {"note": "x" * 200_000}]}, big=True)
        db.delete_history([f"big{i}"])  # small: runs only after the large write before it
    db.add_history("small", 99, {"prompt": [99, "small", {}]})
    assert [pid for pid, _, _ in db.load_history()] == ["small"]
    db.close()
    assert [pid for pid, _, _ in Store(tmp_path / "order.db").load_history()] == ["small"]
