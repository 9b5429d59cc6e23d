"""The state in PostgreSQL (`storage: {url: postgresql://…}`): the same StateStore as the
embedded SQLite, on a server that outlives any one coordinator; and `open_store`, which
of the two the config names.

It runs the SQLite store's statements, spoken as PostgreSQL speaks them, on the same
thread of its own (psycopg 3 is used synchronously there, as sqlite3 is).  The schema is
created and versioned by ComfyLB; a database whose schema is newer than this code, or one
that cannot be reached, stops the coordinator with one line, as a config error does.

Which of several coordinators on one database writes here is leadership.py's business.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from .config import Config
from .store import BIG_ROW, Snapshot, StateStore, Store, StoreError, write_all

log = logging.getLogger(__name__)

SCHEMA_LOCK = 0x436F6D66794C43  # held while the schema is made (LOCK_KEY in leadership.py + 1)
SCHEMA_VERSION = 2  # 2: inputs (uploads), so any coordinator that takes the lead has them

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    prompt_id TEXT PRIMARY KEY, body TEXT NOT NULL, state TEXT NOT NULL, peer TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    dispatched_at DOUBLE PRECISION, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION,
    attempt_log TEXT NOT NULL DEFAULT '[]', created DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_live ON tasks (state);
CREATE TABLE IF NOT EXISTS task_state (
    prompt_id TEXT PRIMARY KEY, state TEXT NOT NULL, peer TEXT, attempts INTEGER NOT NULL, error TEXT,
    dispatched_at DOUBLE PRECISION, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION,
    attempt_log TEXT NOT NULL);
CREATE OR REPLACE VIEW task_view AS SELECT t.prompt_id, t.body,
    COALESCE(s.state, t.state) AS state,
    CASE WHEN s.prompt_id IS NULL THEN t.peer ELSE s.peer END AS peer,
    COALESCE(s.attempts, t.attempts) AS attempts,
    CASE WHEN s.prompt_id IS NULL THEN t.error ELSE s.error END AS error,
    CASE WHEN s.prompt_id IS NULL THEN t.dispatched_at ELSE s.dispatched_at END AS dispatched_at,
    CASE WHEN s.prompt_id IS NULL THEN t.started_at ELSE s.started_at END AS started_at,
    CASE WHEN s.prompt_id IS NULL THEN t.finished_at ELSE s.finished_at END AS finished_at,
    COALESCE(s.attempt_log, t.attempt_log) AS attempt_log,
    t.created
    FROM tasks t LEFT JOIN task_state s ON s.prompt_id = t.prompt_id;
CREATE TABLE IF NOT EXISTS history (prompt_id TEXT PRIMARY KEY, position BIGINT NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_order ON history (position);
CREATE TABLE IF NOT EXISTS peers (name TEXT PRIMARY KEY, config TEXT NOT NULL, id BIGSERIAL);
CREATE TABLE IF NOT EXISTS files (type TEXT, subfolder TEXT, filename TEXT, peer TEXT NOT NULL,
                                  PRIMARY KEY (type, subfolder, filename));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inputs (type TEXT, subfolder TEXT, filename TEXT, sha256 TEXT NOT NULL, data BYTEA NOT NULL,
                                   PRIMARY KEY (type, subfolder, filename));
CREATE TABLE IF NOT EXISTS runs (shape BYTEA NOT NULL, features TEXT NOT NULL, seconds DOUBLE PRECISION NOT NULL,
                                 id BIGSERIAL);
"""
TABLES = ("tasks", "task_state", "history", "peers", "files", "runs")  # emptied by a rebuild, and meta but KEPT
# meta rows that are the database's, not the state's: a rebuild from memory keeps them (the
# leader's address: without it no stand-by would find the leader until the next takeover;
# the secret edges sign with)
KEPT = ("schema_version", "leader", "edge_secret")

# INSERT OR REPLACE, as PostgreSQL says it: (the row's key, its other columns)
_UPSERT = {
    "tasks": (("prompt_id",), ("body", "state", "peer", "attempts", "error", "dispatched_at", "started_at",
                               "finished_at", "attempt_log", "created")),
    "task_state": (("prompt_id",), ("state", "peer", "attempts", "error", "dispatched_at", "started_at",
                                    "finished_at", "attempt_log")),
    "history": (("prompt_id",), ("position", "entry")),
    "peers": (("name",), ("config",)),
    "files": (("type", "subfolder", "filename"), ("peer",)),
    "meta": (("key",), ("value",)),
    "inputs": (("type", "subfolder", "filename"), ("sha256", "data")),
}
_REPLACE = re.compile(r"^INSERT OR REPLACE INTO (\w+)(.*)$", re.S)


def _driver() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError("storage.url needs the psycopg package: pip install 'psycopg[binary]'") from None
    return psycopg


def connect(url: str) -> Any:
    """A connection to the database at `url` (autocommit), or one clear StoreError line."""
    psycopg = _driver()
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"state database {redacted(url)} cannot be reached ({reason}); check storage.url and "
                         "that PostgreSQL is running") from None


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@functools.lru_cache(maxsize=256)  # the store's statements are a few fixed strings, each run again and again
def dialect(sql: str) -> str:
    """A statement of the SQLite store's, as PostgreSQL takes it."""
    m = _REPLACE.match(sql)
    if m is not None:
        table, rest = m.groups()
        keys, others = _UPSERT[table]
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in others)
        sql = f"INSERT INTO {table}{rest} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
    return sql.replace("rowid", "id").replace("?", "%s")


class PgStore(Store):
    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(redacted(url))

    def _open(self, path: str) -> Any:
        db = connect(self.url)
        self.ERRORS = (_driver().Error,)
        try:
            self._prepare(db, path)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, db: Any, path: str) -> None:
        # coordinators started together would create the same tables at once, and one of
        # them fail on PostgreSQL's catalog: one at a time
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row and str(row[0]).isdigit() else 0
            if version > SCHEMA_VERSION:
                raise StoreError(f"state database {path} has schema version {version}, newer than this ComfyLB "
                                 f"knows ({SCHEMA_VERSION}): upgrade ComfyLB, or point storage.url at another "
                                 "database")
            db.execute(SCHEMA)
            if version < SCHEMA_VERSION:
                db.execute("INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE SET value = "
                           "EXCLUDED.value", (str(SCHEMA_VERSION),))
                log.info("state database %s: schema version %d created", path, SCHEMA_VERSION)

    def _sql(self, sql: str) -> str:
        return dialect(sql)

    def _execute(self, sql: str, params: Any, many: bool) -> None:
        if many:
            with self.db.cursor() as cur:
                cur.executemany(self._sql(sql), params)
        else:
            self.db.execute(self._sql(sql), params)

    def needs_rebuild(self) -> bool:
        """A write failed (the server went away, say): the whole state is written again."""
        return self.problem is not None and not self._rebuilding

    def _replace(self, state: Snapshot, rows: list[tuple[str, Callable[[], tuple]]]) -> bool:
        try:
            if self.db.closed or self.db.broken:
                self.db = self._open(self.path)
            with self.db.transaction():
                for table in TABLES:  # our own names
                    self.db.execute(f"DELETE FROM {table}")
                self.db.execute("DELETE FROM meta WHERE key <> ALL(%s)", (list(KEPT),))
                write_all(lambda sql, params, many=False: self._execute(sql, params, many), state, rows)
        except Exception as e:
            if not isinstance(e, (StoreError, *self.ERRORS)):
                raise
            log.warning("state database %s: still cannot write it (%s); trying again shortly", self.path, e)
            return False
        log.warning("state database %s: written again from memory (%d task(s), %d history entries); "
                    "nothing acknowledged was lost", self.path, len(state.tasks), len(state.history))
        self.problem = None
        return True

    # -- uploaded inputs: in the database, so the next leader has them ------------------------
    async def save_input(self, key: tuple[str, str, str], sha256: str, data: bytes) -> None:
        """Acknowledged (the upload answered) only once stored: a leader killed right after
        must not leave a prompt naming a file the next one lacks."""
        stored = await asyncio.wrap_future(self._future(
            lambda: self._run("INSERT OR REPLACE INTO inputs VALUES (?,?,?,?,?)", (*key, sha256, data)),
            big=len(data) > BIG_ROW))
        if not stored:
            raise StoreError(f"state database {self.path}: {self.problem}")

    def fetch_inputs(self, have: Callable[[tuple[str, str, str]], str | None],
                     put: Callable[[tuple[str, str, str], bytes], None]) -> "Future[int]":
        """Every stored input this coordinator lacks (or holds other bytes of) written by
        `put`, on the database's thread, one row in memory at a time; how many."""
        def fetch() -> int:
            wanted = [key for *key, sha in self._query("SELECT type, subfolder, filename, sha256 FROM inputs").fetchall()
                      if have(tuple(key)) != sha]
            for key in wanted:
                row = self._query("SELECT data FROM inputs WHERE type=? AND subfolder=? AND filename=?", key).fetchone()
                if row is not None:
                    put(tuple(key), bytes(row[0]))
            return len(wanted)
        return self._future(fetch, big=True)


def open_store(cfg: Config) -> StateStore:
    """The state store the config names: PostgreSQL (storage.url) or the embedded SQLite
    (storage.database under storage.dir; ":memory:" keeps nothing)."""
    started = time.perf_counter()
    store: StateStore
    if cfg.storage.url:
        store = PgStore(cfg.storage.url)
    else:
        name = cfg.storage.database
        store = Store(None if name == ":memory:" else Path(cfg.storage.dir) / name)
    log.info("state in %s (%.0f ms to open)", store.path, (time.perf_counter() - started) * 1000)
    return store
