"""Which coordinator dispatches, when several share one PostgreSQL database.

One of them leads: it holds a session-level advisory lock on a connection of its own and
runs the cluster (peers, queue, dispatch), linked to every peer under the cluster's one
client id.  The others stand by: they serve clients by passing every request to the
leader (proxy.py) and wait for the lock — PostgreSQL hands it over the moment the
leader's session ends.  A leader killed outright loses its session at once; one whose
machine vanishes loses it through TCP keepalives, within LEASE seconds.  The new leader
restores the state from the database, links to the peers under the same client id (so
the prompts its predecessor sent keep reporting to it) and reconciles them.

A leader that loses its own connection to the database stops at once: another has taken
over, or will, and two leaders must never dispatch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from .pgstore import SCHEMA_LOCK, connect, redacted

log = logging.getLogger(__name__)

LOCK_KEY = 0x436F6D66794C42  # "ComfyLB"
LEASE = 10                   # seconds after which a vanished leader's session is dropped
CHECK_EVERY = 2.0            # seconds between a leader's checks that it still holds its session
CHANNEL = "comfylb_leader"   # a new leader's address, told to every stand-by by NOTIFY
FRESH = 1.0                  # seconds a looked-up address is used without looking again
TOLD_FRESH = 30.0            # … while NOTIFY would tell of a change (a stand-by's listener runs)


class Leadership:
    def __init__(self, url: str, me: str) -> None:
        self.url = url
        self.shown = redacted(url)  # for logs
        self.me = me        # how clients reach this coordinator (server.advertise_url)
        self.leading = False
        self._holder = self._connect()  # holds the lock while leading; waits for it while not
        self._db = self._connect()      # everything else (the leader's address)
        self._seen: tuple[float, str | None] = (0.0, None)
        self._looking: asyncio.Future[str | None] | None = None  # a look-up under way: every request waits for it
        self._listening = False
        self._closed = threading.Event()
        self.heard = threading.Event()  # a new leader was announced (set by the listener)
        self._edge_secret: str | None = None

    def _connect(self) -> Any:
        db = connect(self.url)
        # a leader whose machine vanishes must lose the lock within LEASE seconds
        third = max(1, LEASE // 4)
        db.execute(f"SET tcp_keepalives_idle = {third}; SET tcp_keepalives_interval = {third}; "
                   "SET tcp_keepalives_count = 2")
        return db

    def try_lead(self) -> bool:
        self.leading = bool(self._holder.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0])
        if self.leading:
            self._announce()
        return self.leading

    async def wait_to_lead(self) -> None:
        """Returns once this coordinator leads (blocks a thread, not the event loop)."""
        await asyncio.to_thread(self._holder.execute, "SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        self.leading = True
        self._announce()

    def _announce(self) -> None:
        self._seen = (0.0, None)
        with self._db.transaction():  # the store may be making the schema right now: one at a time
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("INSERT INTO meta VALUES ('leader', %s) ON CONFLICT (key) DO UPDATE SET value = "
                         "EXCLUDED.value", (json.dumps({"url": self.me, "since": time.time()}),))
        self._db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.me))  # stand-bys pass clients on at once
        log.info("this coordinator leads the cluster (state in %s)", self.shown)

    async def leader(self) -> str | None:
        """The leading coordinator's URL, as it announced it.  Asked on every request a
        stand-by passes on: looked up in the database (in a thread) at most once a second,
        and once for all the requests that arrive meanwhile."""
        at, url = self._seen
        if time.monotonic() - at < (TOLD_FRESH if self._listening else FRESH):
            return url
        if self._looking is None:
            self._looking = asyncio.ensure_future(asyncio.to_thread(self._look_up))
            self._looking.add_done_callback(lambda _: setattr(self, "_looking", None))
        return await asyncio.shield(self._looking)

    async def edge_secret(self) -> str | None:
        """What an edge (edge.py) signs with: made by the first leader, kept in the database."""
        if self._edge_secret is None:
            self._edge_secret = await asyncio.to_thread(self._read_edge_secret)
        return self._edge_secret

    def _read_edge_secret(self) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'edge_secret'").fetchone()
            found = json.loads(row[0]) if row else None
        except Exception:  # noqa: BLE001 - no table yet, the server away: not yet
            return None
        return found if isinstance(found, str) and len(found) >= 32 else None

    def listen(self) -> None:
        """While standing by: a new leader's address arrives by NOTIFY the moment it leads,
        instead of at the next look-up."""
        if self._listening:
            return
        conn = connect(self.url)
        conn.execute(f"LISTEN {CHANNEL}")
        self._listening = True

        def run() -> None:
            try:
                while self._listening:
                    for note in conn.notifies(timeout=1.0):
                        self._seen = (time.monotonic(), self._other(note.payload))
                        self.heard.set()
            except Exception as e:  # noqa: BLE001 - the server went away: look the leader up again
                log.info("no longer told of new leaders (%s); looking them up instead", e)
            finally:
                self._listening = False
                conn.close()
        threading.Thread(target=run, name="comfylb-leader-listener", daemon=True).start()

    def _look_up(self) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'leader'").fetchone()
            found = json.loads(row[0]).get("url") if row else None
        except Exception:  # noqa: BLE001 - no table yet, a row someone broke, the server away: no leader
            found = None
        url = self._other(found)
        self._seen = (time.monotonic(), url)
        return url

    def _other(self, found: object) -> str | None:
        """The address another coordinator announced, if it is one requests can be passed
        to (an http(s) URL): a row or NOTIFY someone else wrote is no leader."""
        if not isinstance(found, str) or found == self.me:
            return None
        try:
            parts = urlsplit(found)
            parts.port  # noqa: B018 - ValueError: a port out of range, or not a number
        except ValueError:
            return None
        return found if parts.scheme in ("http", "https") and parts.hostname else None

    def watch(self, lost: Callable[[], object]) -> threading.Thread:
        """While leading: `lost()` (once) if the session holding the lock is gone."""
        def run() -> None:
            while not self._closed.wait(CHECK_EVERY) and self.leading:
                try:
                    self._holder.execute("SELECT 1")
                except Exception as e:  # noqa: BLE001 - any failure means the lock may be gone
                    if self._closed.is_set():
                        return  # closed under it: stopping, not lost
                    log.error("lost the connection that makes this coordinator the leader (%s); stopping so that "
                              "no two coordinators dispatch", e)
                    self.leading = False
                    lost()
        t = threading.Thread(target=run, name="comfylb-leadership", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.leading = False
        self._listening = False
        self._closed.set()
        try:
            self._holder.cancel()  # a wait for the lock, in its thread, ends now
        except Exception:  # noqa: BLE001 - nothing was running
            pass
        for db in (self._holder, self._db):
            try:
                db.close()  # the lock goes with the session
            except Exception:  # noqa: BLE001 - closing anyway
                pass
