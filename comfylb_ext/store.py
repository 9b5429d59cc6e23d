"""Durable state in an embedded SQLite database: tasks, history, runtime peers, the
index of which peer produced which file, counters, and the run times the cost model
learns from.

Write-through from the coordinator at every state change (WAL mode: a commit survives the
process being killed).  `Store(None)` keeps nothing, for tests and throw-away runs.

A prompt of tens of MB is encoded and written on a thread of the database's own, not on
the event loop.  Writes keep the order they were asked in: a small one runs at once when
nothing waits for that thread (the thread-hop would cost more than the write), else it
queues behind the others.  Adding a task is awaited (a prompt is acknowledged only once it
is on disk); reads (at start) come after the writes asked before them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, TypeVar

from .config import BackendConfig
from .cost import Shape
from .tasks import SENSITIVE_KEYS, TERMINAL, State, Task

log = logging.getLogger(__name__)

R = TypeVar("R")
BIG_ROW = 1 << 20  # bytes of a task's request: its rows are encoded and written on the database's thread
Params = Any  # a statement's parameters, or a function that makes them (on the database's thread)

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
-- A task's changing state lives apart from its body: SQLite rewrites a whole row at every
-- update, and a body can be tens of MB.  A task with no row here is as first written.
CREATE TABLE IF NOT EXISTS task_state (
    prompt_id TEXT PRIMARY KEY, state TEXT NOT NULL, peer TEXT, attempts INTEGER NOT NULL, error TEXT,
    dispatched_at REAL, started_at REAL, finished_at REAL, attempt_log TEXT NOT NULL
);
CREATE VIEW IF NOT EXISTS task_view AS SELECT t.prompt_id, t.body,
    CASE WHEN s.prompt_id IS NULL THEN t.state ELSE s.state END AS state,
    CASE WHEN s.prompt_id IS NULL THEN t.peer ELSE s.peer END AS peer,
    CASE WHEN s.prompt_id IS NULL THEN t.attempts ELSE s.attempts END AS attempts,
    CASE WHEN s.prompt_id IS NULL THEN t.error ELSE s.error END AS error,
    CASE WHEN s.prompt_id IS NULL THEN t.dispatched_at ELSE s.dispatched_at END AS dispatched_at,
    CASE WHEN s.prompt_id IS NULL THEN t.started_at ELSE s.started_at END AS started_at,
    CASE WHEN s.prompt_id IS NULL THEN t.finished_at ELSE s.finished_at END AS finished_at,
    CASE WHEN s.prompt_id IS NULL THEN t.attempt_log ELSE s.attempt_log END AS attempt_log,
    t.created
    FROM tasks t LEFT JOIN task_state s ON s.prompt_id = t.prompt_id;
CREATE TABLE IF NOT EXISTS history (prompt_id TEXT PRIMARY KEY, position INTEGER NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_order ON history (position);
CREATE TABLE IF NOT EXISTS peers (name TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (type TEXT, subfolder TEXT, filename TEXT, peer TEXT NOT NULL,
                                  PRIMARY KEY (type, subfolder, filename));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (shape BLOB NOT NULL, features TEXT NOT NULL, seconds REAL NOT NULL);
"""

_FINISHED = tuple(sorted(s.value for s in TERMINAL))
_BODY = ("number", "seq", "prompt", "extra_data", "outputs", "client_id", "partial_targets", "messages", "size")


class StoreError(Exception):
    """The state database cannot be used: one line for people, like a config error."""


@dataclass
class Snapshot:
    """Everything the database holds, from memory: written afresh when the file was lost."""
    meta: dict[str, Any]
    peers: list[BackendConfig]
    tasks: list[Task]
    history: list[tuple[str, int, dict]]
    files: dict[tuple[str, str, str], str]
    runs: list[tuple[Shape, float]]


class StateStore(Protocol):
    """What the coordinator keeps durably, whatever keeps it.  Writes never raise but
    add_task (a prompt is acknowledged only once it is stored); a failed write sets
    `problem` and `needs_rebuild`, and `rebuild` writes the whole state from memory."""

    path: str
    problem: str | None

    def close(self) -> None: ...
    def needs_rebuild(self) -> bool: ...
    def rebuild(self, state: Snapshot) -> None: ...
    async def add_task(self, t: Task) -> None: ...
    def delete_task(self, prompt_id: str) -> None: ...
    def update_task(self, t: Task) -> None: ...
    def load_tasks(self, finished: int) -> list[Task]: ...
    def prune_tasks(self, keep: int) -> None: ...
    def add_history(self, prompt_id: str, position: int, entry: dict, big: bool = False) -> None: ...
    def delete_history(self, prompt_ids: Iterable[str]) -> None: ...
    def clear_history(self) -> None: ...
    def prune_history(self, keep: int) -> None: ...
    def load_history(self) -> list[tuple[str, int, dict]]: ...
    def save_peer(self, b: BackendConfig) -> None: ...
    def delete_peer(self, name: str) -> None: ...
    def load_peers(self) -> list[BackendConfig]: ...
    def set_files(self, rows: list[tuple[str, str, str, str]]) -> None: ...
    def load_files(self) -> dict[tuple[str, str, str], str]: ...
    def add_run(self, shape: Shape, seconds: float) -> None: ...
    def prune_runs(self, keep: int) -> None: ...
    def load_runs(self, keep: int) -> list[tuple[Shape, float]]: ...
    def get(self, key: str, default: Any = None) -> Any: ...
    def put(self, key: str, value: Any) -> None: ...
    async def save_input(self, key: tuple[str, str, str], sha256: str, data: bytes) -> None: ...
    def fetch_inputs(self, have: Callable[[tuple[str, str, str]], str | None],
                     put: Callable[[tuple[str, str, str], bytes], None]) -> "Future[int]": ...


class Store:
    """The state in an embedded SQLite database (StateStore).  Every write goes through
    `_write`: a failed one (a full disk, a file deleted under us) is logged once and marks
    the store as needing a rebuild from memory, which the coordinator does as soon as it
    can (`needs_rebuild`, `rebuild`).  Only adding a task raises, so a prompt is
    acknowledged only once it is on disk."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = str(path) if path else ":memory:"
        self.problem: str | None = None
        self._identity: tuple[int, int] | None = None
        self._rebuilding = False
        self.db: Any = self._open(self.path)
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future | None] | None] = queue.SimpleQueue()
        # jobs handed to the thread, and jobs it finished: each counter has one writer
        self._queued = self._done = 0
        self._thread = threading.Thread(target=self._work, name="comfylb-store", daemon=True)
        self._thread.start()

    # -- the database's own thread -------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits, or said
                if done is None:
                    log.error("state database %s: a queued write failed", self.path, exc_info=e)
                else:
                    done.set_exception(e)
            else:
                if done is not None:
                    done.set_result(result)
            self._done += 1
        self.db.close()

    def _idle(self) -> bool:
        """Nothing is queued or running on the thread: a job may run here, in order."""
        return self._queued == self._done

    def _later(self, fn: Callable[[], Any], big: bool = False) -> None:
        if not big and self._idle():
            fn()
            return
        self._queued += 1
        self._jobs.put((fn, None))

    def _future(self, fn: Callable[[], R], big: bool = False) -> "Future[R]":
        done: Future[R] = Future()
        if not big and self._idle():
            done.set_result(fn())
            return done
        self._queued += 1
        self._jobs.put((fn, done))
        return done

    def _now(self, fn: Callable[[], R]) -> R:
        """A read, after every write asked before it (blocks: used at start)."""
        return self._future(fn).result()

    def _open(self, path: str) -> sqlite3.Connection:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA secure_delete=ON")  # what a finished task drops (API keys) is not left in free pages
            db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"state database {path} cannot be used ({e}); move it away to start with an empty "
                             "state (what it held is then forgotten)") from None
        if path != ":memory:":
            for f in (path, path + "-wal", path + "-shm"):  # it holds Comfy.org API keys of queued prompts
                try:
                    os.chmod(f, 0o600)
                except OSError:
                    pass
            self._identity = _identity(path)
        return db

    def close(self) -> None:
        """Every queued write lands, then the database is closed."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    # -- health ----------------------------------------------------------------------
    def _write(self, sql: str, params: Params = (), many: bool = False) -> None:
        self._later(lambda: self._run(sql, params, many))

    # what a database's driver raises; the SQL as this database speaks it (pgstore.py)
    ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)

    def _sql(self, sql: str) -> str:
        return sql

    def _query(self, sql: str, params: Any = ()) -> Any:
        return self.db.execute(self._sql(sql), params)

    def _execute(self, sql: str, params: Any, many: bool) -> None:
        (self.db.executemany if many else self.db.execute)(self._sql(sql), params)

    def _run(self, sql: str, params: Params = (), many: bool = False) -> bool:
        """One statement, on the database's thread."""
        try:
            self._execute(sql, params() if callable(params) else params, many)
            return True
        except self.ERRORS as e:
            if self.problem is None:
                log.error("state database %s: a write failed (%s); state is kept in memory and written "
                          "again as soon as the database takes it", self.path, e)
            self.problem = str(e)
            return False

    def needs_rebuild(self) -> bool:
        """A write failed, or the file was deleted or replaced while we ran."""
        if self.path == ":memory:" or self._rebuilding:
            return False
        if self.problem is None and _identity(self.path) != self._identity:
            self.problem = "the database file was deleted or replaced"
            log.error("state database %s: %s; writing the whole state again", self.path, self.problem)
        return self.problem is not None

    def rebuild(self, state: Snapshot) -> None:
        """Write the whole state into a new file in place of the old one (queued)."""
        rows = [task_values(t, public=t.state in TERMINAL) for t in state.tasks]  # as they are now
        self._rebuilding = True
        self._later(lambda: self._rebuild(state, rows), big=True)

    def _rebuild(self, state: Snapshot, rows: list[tuple[str, Callable[[], tuple]]]) -> bool:
        try:
            return self._replace(state, rows)
        finally:
            self._rebuilding = False

    def _replace(self, state: Snapshot, rows: list[tuple[str, Callable[[], tuple]]]) -> bool:
        fresh = self.path + ".new"
        try:
            for f in (fresh, fresh + "-wal", fresh + "-shm"):
                if os.path.exists(f):
                    os.unlink(f)
            db = sqlite3.connect(fresh, isolation_level=None, check_same_thread=False)
            try:
                db.executescript(SCHEMA)
                db.execute("BEGIN")
                write_all(lambda sql, params, many=False: (db.executemany if many else db.execute)(sql, params),
                           state, rows)
                db.execute("COMMIT")
            finally:
                db.close()
            self.db.close()
            for f in (self.path + "-wal", self.path + "-shm"):
                if os.path.exists(f):
                    os.unlink(f)
            os.replace(fresh, self.path)
        except (sqlite3.Error, OSError) as e:
            log.warning("state database %s: still cannot write it (%s); trying again shortly", self.path, e)
            try:
                self.db = self._open(self.path)
            except StoreError:
                pass
            return False
        self.db = self._open(self.path)
        log.warning("state database %s: written again from memory (%d task(s), %d history entries); "
                    "nothing acknowledged was lost", self.path, len(state.tasks), len(state.history))
        self.problem = None
        return True

    # -- tasks -------------------------------------------------------------------------
    async def add_task(self, t: Task) -> None:
        """A new prompt, durably: StoreError if it is not on disk (the prompt is refused)."""
        statements = [task_values(t), ("DELETE FROM task_state WHERE prompt_id=?", (t.prompt_id,))]
        done = self._future(lambda: self._atomically(statements), big=t.size > BIG_ROW)
        if not (done.result() if done.done() else await asyncio.wrap_future(done)):
            raise StoreError(f"the coordinator cannot store the prompt ({self.problem})")

    def delete_task(self, prompt_id: str) -> None:
        self._transaction([("DELETE FROM tasks WHERE prompt_id=?", (prompt_id,)),
                           ("DELETE FROM task_state WHERE prompt_id=?", (prompt_id,))])

    def update_task(self, t: Task) -> None:
        state = ("INSERT OR REPLACE INTO task_state VALUES (?,?,?,?,?,?,?,?,?)",
                 (t.prompt_id, t.state.value, t.peer, t.attempts, t.error, t.dispatched_at, t.started_at, t.finished_at,
                  json.dumps(t.attempt_log)))
        if t.secrets_dropped:
            t.secrets_dropped = False  # a finished task keeps no Comfy.org keys on disk: its body once more
            self._transaction([task_values(t, public=True), ("DELETE FROM task_state WHERE prompt_id=?", (t.prompt_id,))],
                              big=t.size > BIG_ROW)
            return
        self._write(*state)

    def load_tasks(self, finished: int) -> list[Task]:
        """Every unfinished task, and the newest `finished` finished ones, oldest first."""
        return self._now(lambda: self._load_tasks(finished))

    def _load_tasks(self, finished: int) -> list[Task]:
        live = self._query("SELECT * FROM task_view WHERE state NOT IN (?,?,?) ORDER BY created", _FINISHED)
        done = self._query("SELECT * FROM (SELECT * FROM task_view WHERE state IN (?,?,?) ORDER BY created DESC"
                               " LIMIT ?) ORDER BY created", (*_FINISHED, finished))
        return _readable(self._task, list(done) + list(live), "task")

    def prune_tasks(self, keep: int) -> None:
        self._transaction([
            ("DELETE FROM tasks WHERE prompt_id IN (SELECT prompt_id FROM task_view WHERE state IN (?,?,?)"
             " AND prompt_id NOT IN (SELECT prompt_id FROM task_view WHERE state IN (?,?,?) ORDER BY created DESC"
             " LIMIT ?))", (*_FINISHED, *_FINISHED, keep)),
            ("DELETE FROM task_state WHERE prompt_id NOT IN (SELECT prompt_id FROM tasks)", ())])

    def _transaction(self, statements: list[tuple[str, Params]], big: bool = False) -> None:
        self._later(lambda: self._atomically(statements), big)

    def _atomically(self, statements: list[tuple[str, Params]]) -> bool:
        """Several writes, all or none (on the database's thread)."""
        if not self._run("BEGIN"):
            return False
        for sql, params in statements:
            if not self._run(sql, params):
                try:
                    self.db.execute("ROLLBACK")
                except self.ERRORS:
                    pass
                return False
        if self._run("COMMIT"):
            return True
        try:
            self.db.execute("ROLLBACK")
        except self.ERRORS:
            pass
        return False

    @staticmethod
    def _task(row: sqlite3.Row | tuple) -> Task:
        (pid, body, state, peer, attempts, error, dispatched_at, started_at, finished_at, attempt_log, created) = row
        b = json.loads(body)
        targets = b.pop("targets", None)
        t = Task(pid, **{k: b[k] for k in _BODY if k in b}, state=State(state), peer=peer, attempts=attempts, error=error,
                 dispatched_at=dispatched_at, started_at=started_at, finished_at=finished_at, created=created)
        t.targets = frozenset(targets) if targets is not None else None
        t.attempt_log = json.loads(attempt_log)
        if (not isinstance(t.prompt, dict) and not (t.prompt is None and state in TERMINAL)
                or not isinstance(t.extra_data, dict) or not isinstance(t.attempt_log, list)):
            raise ValueError("not a task")
        return t

    # -- history -----------------------------------------------------------------------
    def add_history(self, prompt_id: str, position: int, entry: dict, big: bool = False) -> None:
        """`big`: its prompt is large (tens of MB, maybe): encoded on the database's thread."""
        self._later(lambda: self._run("INSERT OR REPLACE INTO history VALUES (?,?,?)",
                                      lambda: (prompt_id, position, json.dumps(entry))), big)

    def delete_history(self, prompt_ids: Iterable[str]) -> None:
        self._write("DELETE FROM history WHERE prompt_id=?", [(p,) for p in prompt_ids], many=True)

    def clear_history(self) -> None:
        self._write("DELETE FROM history")

    def prune_history(self, keep: int) -> None:
        self._write("DELETE FROM history WHERE position <= (SELECT position FROM history ORDER BY position DESC"
                    " LIMIT 1 OFFSET ?)", (keep,))

    def load_history(self) -> list[tuple[str, int, dict]]:
        def entry(row: tuple) -> tuple[str, int, dict]:
            pid, pos, e = row
            value = json.loads(e)
            if not isinstance(value, dict) or not isinstance(pos, int):
                raise ValueError("not a history entry")
            return pid, pos, value
        return self._now(lambda: _readable(
            entry, self._query("SELECT prompt_id, position, entry FROM history ORDER BY position"), "history entry"))

    # -- peers added at runtime ----------------------------------------------------------
    def save_peer(self, b: BackendConfig) -> None:
        self._write("INSERT OR REPLACE INTO peers VALUES (?,?)", (b.name, json.dumps(asdict(b))))

    def delete_peer(self, name: str) -> None:
        self._write("DELETE FROM peers WHERE name=?", (name,))

    def load_peers(self) -> list[BackendConfig]:
        return self._now(lambda: _readable(lambda row: BackendConfig(**json.loads(row[0])),
                                           self._query("SELECT config FROM peers ORDER BY rowid"), "peer"))

    # -- uploaded inputs ---------------------------------------------------------------------
    # Kept in the database only where several coordinators share it (pgstore.py): here the
    # files in storage.dir are the record.
    async def save_input(self, key: tuple[str, str, str], sha256: str, data: bytes) -> None:
        return None

    def fetch_inputs(self, have: Callable[[tuple[str, str, str]], str | None],
                     put: Callable[[tuple[str, str, str], bytes], None]) -> "Future[int]":
        done: Future[int] = Future()
        done.set_result(0)
        return done

    # -- files and counters ----------------------------------------------------------------
    def set_files(self, rows: list[tuple[str, str, str, str]]) -> None:
        self._write("INSERT OR REPLACE INTO files VALUES (?,?,?,?)", rows, many=True)

    def load_files(self) -> dict[tuple[str, str, str], str]:
        return self._now(lambda: {(t, s, f): p for t, s, f, p in
                                  self._query("SELECT type, subfolder, filename, peer FROM files")})

    # -- run times, for the cost model ----------------------------------------------------
    def add_run(self, shape: Shape, seconds: float) -> None:
        self._write("INSERT INTO runs VALUES (?,?,?)", (shape.key, json.dumps(shape.features), seconds))

    def prune_runs(self, keep: int) -> None:
        self._write("DELETE FROM runs WHERE rowid <= (SELECT rowid FROM runs ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                    (keep,))

    def load_runs(self, keep: int) -> list[tuple[Shape, float]]:
        """The newest `keep` runs, oldest first; older ones are deleted."""
        self.prune_runs(keep)

        def run(row: tuple) -> tuple[Shape, float]:
            key, f, seconds = row
            return Shape(key, tuple(float(x) for x in json.loads(f))), float(seconds)
        return self._now(lambda: _readable(run, self._query("SELECT shape, features, seconds FROM runs ORDER BY rowid"),
                                           "run"))

    def get(self, key: str, default: Any = None) -> Any:
        row = self._now(lambda: self._query("SELECT value FROM meta WHERE key=?", (key,)).fetchone())
        try:
            return json.loads(row[0]) if row else default
        except (ValueError, RecursionError, TypeError):
            return default

    def put(self, key: str, value: Any) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, json.dumps(value)))


_TASK_INSERT = ("INSERT OR REPLACE INTO tasks (prompt_id, body, state, peer, attempts, error, dispatched_at, started_at,"
                " finished_at, attempt_log, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)")


def task_values(t: Task, public: bool = False) -> tuple[str, Callable[[], tuple]]:
    """A task's row as it is now, encoded later (on the database's thread): its body holds
    the prompt, which may be tens of MB.  What changes afterwards is copied now."""
    body = {k: getattr(t, k) for k in _BODY}
    body["messages"] = list(t.messages)
    if public:
        body["extra_data"] = {k: v for k, v in t.extra_data.items() if k not in SENSITIVE_KEYS}
    body["targets"] = sorted(t.targets) if t.targets is not None else None
    row = (t.prompt_id, t.state.value, t.peer, t.attempts, t.error, t.dispatched_at, t.started_at, t.finished_at,
           json.dumps(t.attempt_log), t.created)
    return _TASK_INSERT, lambda: (row[0], json.dumps(body), *row[1:])


def _readable(parse: Callable[[Any], Any], rows: Iterable, what: str) -> list:
    """Rows that parse; any other (hand-edited, too deeply nested, …) is skipped and said."""
    out, bad = [], 0
    for row in rows:
        try:
            out.append(parse(row))
        except (ValueError, TypeError, KeyError, RecursionError):
            bad += 1
    if bad:
        log.warning("state database: %d unreadable %s row(s) skipped", bad, what)
    return out


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def write_all(execute: Callable[..., Any], state: Snapshot, rows: list[tuple[str, Callable[[], tuple]]]) -> None:
    """The whole state into empty tables, through `execute(sql, params, many=False)`."""
    execute("INSERT INTO meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in state.meta.items()], True)
    execute("INSERT INTO peers VALUES (?,?)", [(b.name, json.dumps(asdict(b))) for b in state.peers], True)
    for sql, values in rows:
        execute(sql, values())
    execute("INSERT INTO history VALUES (?,?,?)", [(p, pos, json.dumps(e)) for p, pos, e in state.history], True)
    execute("INSERT INTO files VALUES (?,?,?,?)", [(*k, p) for k, p in state.files.items()], True)
    execute("INSERT INTO runs VALUES (?,?,?)", [(shape.key, json.dumps(shape.features), sec)
                                                for shape, sec in state.runs], True)
