"""Durable state in an embedded SQLite database: tasks, history, runtime peers, the
index of which peer produced which file, counters, and the run times the cost model
learns from.

Write-through from the coordinator at every state change (WAL mode: a commit survives the
process being killed).  `Store(None)` keeps nothing, for tests and throw-away runs.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from .config import BackendConfig
from .cost import Shape
from .tasks import TERMINAL, Task

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    prompt_id TEXT PRIMARY KEY,
    body TEXT NOT NULL,            -- what never changes: prompt, extra_data, outputs, routing, number, seq
    state TEXT NOT NULL,
    peer TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    dispatched_at REAL, started_at REAL, finished_at REAL,
    attempt_log TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_live ON tasks (state);
CREATE TABLE IF NOT EXISTS history (prompt_id TEXT PRIMARY KEY, position INTEGER NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_order ON history (position);
CREATE TABLE IF NOT EXISTS peers (name TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (type TEXT, subfolder TEXT, filename TEXT, peer TEXT NOT NULL,
                                  PRIMARY KEY (type, subfolder, filename));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (shape BLOB NOT NULL, features TEXT NOT NULL, seconds REAL NOT NULL);
"""

_BODY = ("number", "seq", "prompt", "extra_data", "outputs", "client_id", "partial_targets", "messages")


class Store:
    def __init__(self, path: str | Path | None) -> None:
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- tasks -------------------------------------------------------------------------
    def add_task(self, t: Task) -> None:
        body = {k: getattr(t, k) for k in _BODY}
        body["targets"] = sorted(t.targets) if t.targets is not None else None
        self.db.execute(
            "INSERT OR REPLACE INTO tasks (prompt_id, body, state, peer, attempts, error, dispatched_at, started_at,"
            " finished_at, attempt_log, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (t.prompt_id, json.dumps(body), t.state, t.peer, t.attempts, t.error, t.dispatched_at, t.started_at,
             t.finished_at, json.dumps(t.attempt_log), t.created))

    def delete_task(self, prompt_id: str) -> None:
        self.db.execute("DELETE FROM tasks WHERE prompt_id=?", (prompt_id,))

    def update_task(self, t: Task) -> None:
        self.db.execute(
            "UPDATE tasks SET state=?, peer=?, attempts=?, error=?, dispatched_at=?, started_at=?, finished_at=?,"
            " attempt_log=? WHERE prompt_id=?",
            (t.state, t.peer, t.attempts, t.error, t.dispatched_at, t.started_at, t.finished_at,
             json.dumps(t.attempt_log), t.prompt_id))

    def load_tasks(self, finished: int) -> list[Task]:
        """Every unfinished task, and the newest `finished` finished ones, oldest first."""
        live = self.db.execute("SELECT * FROM tasks WHERE state NOT IN (?,?,?) ORDER BY created", tuple(TERMINAL))
        done = self.db.execute("SELECT * FROM (SELECT * FROM tasks WHERE state IN (?,?,?) ORDER BY created DESC"
                               " LIMIT ?) ORDER BY created", (*TERMINAL, finished))
        return [self._task(row) for row in list(done) + list(live)]

    def prune_tasks(self, keep: int) -> None:
        self.db.execute("DELETE FROM tasks WHERE state IN (?,?,?) AND prompt_id NOT IN (SELECT prompt_id FROM tasks"
                        " WHERE state IN (?,?,?) ORDER BY created DESC LIMIT ?)", (*TERMINAL, *TERMINAL, keep))

    @staticmethod
    def _task(row: sqlite3.Row | tuple) -> Task:
        (pid, body, state, peer, attempts, error, dispatched_at, started_at, finished_at, attempt_log, created) = row
        b = json.loads(body)
        targets = b.pop("targets", None)
        t = Task(pid, **{k: b[k] for k in _BODY if k in b}, state=state, peer=peer, attempts=attempts, error=error,
                 dispatched_at=dispatched_at, started_at=started_at, finished_at=finished_at, created=created)
        t.targets = frozenset(targets) if targets is not None else None
        t.attempt_log = json.loads(attempt_log)
        return t

    # -- history -----------------------------------------------------------------------
    def add_history(self, prompt_id: str, position: int, entry: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO history VALUES (?,?,?)", (prompt_id, position, json.dumps(entry)))

    def delete_history(self, prompt_ids: Iterable[str]) -> None:
        self.db.executemany("DELETE FROM history WHERE prompt_id=?", [(p,) for p in prompt_ids])

    def clear_history(self) -> None:
        self.db.execute("DELETE FROM history")

    def prune_history(self, keep: int) -> None:
        self.db.execute("DELETE FROM history WHERE position <= (SELECT position FROM history ORDER BY position DESC"
                        " LIMIT 1 OFFSET ?)", (keep,))

    def load_history(self) -> list[tuple[str, int, dict]]:
        return [(pid, pos, json.loads(e)) for pid, pos, e in
                self.db.execute("SELECT prompt_id, position, entry FROM history ORDER BY position")]

    # -- peers added at runtime ----------------------------------------------------------
    def save_peer(self, b: BackendConfig) -> None:
        self.db.execute("INSERT OR REPLACE INTO peers VALUES (?,?)", (b.name, json.dumps(asdict(b))))

    def delete_peer(self, name: str) -> None:
        self.db.execute("DELETE FROM peers WHERE name=?", (name,))

    def load_peers(self) -> list[BackendConfig]:
        return [BackendConfig(**json.loads(c)) for (c,) in self.db.execute("SELECT config FROM peers ORDER BY rowid")]

    # -- files and counters ----------------------------------------------------------------
    def set_files(self, rows: list[tuple[str, str, str, str]]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?)", rows)

    def load_files(self) -> dict[tuple[str, str, str], str]:
        return {(t, s, f): p for t, s, f, p in self.db.execute("SELECT type, subfolder, filename, peer FROM files")}

    # -- run times, for the cost model ----------------------------------------------------
    def add_run(self, shape: Shape, seconds: float) -> None:
        self.db.execute("INSERT INTO runs VALUES (?,?,?)", (shape.key, json.dumps(shape.features), seconds))

    def prune_runs(self, keep: int) -> None:
        self.db.execute("DELETE FROM runs WHERE rowid <= (SELECT rowid FROM runs ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                        (keep,))

    def load_runs(self, keep: int) -> list[tuple[Shape, float]]:
        """The newest `keep` runs, oldest first; older ones are deleted."""
        self.prune_runs(keep)
        return [(Shape(key, tuple(json.loads(f))), seconds)
                for key, f, seconds in self.db.execute("SELECT shape, features, seconds FROM runs ORDER BY rowid")]

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, json.dumps(value)))


def database_path(cfg) -> str | None:
    name = cfg.storage.database
    return None if name == ":memory:" else str(Path(cfg.storage.dir) / name)


def open_store(path: str | None) -> Store:
    started = time.perf_counter()
    store = Store(path)
    log.info("state in %s (%.0f ms to open)", store.path, (time.perf_counter() - started) * 1000)
    return store
