"""Engine and session factories. Nothing is created at import: callers pass settings (or a URL).

Connection pools are per process (`get_engine` caches one engine per URL). On SQLite, writers of one process queue
on an in-process write gate (`WriteGate`) instead of polling the file lock: SQLite lets one writer at a time in,
and its busy handler makes the others sleep and retry, so 40 threads fighting for the lock wasted most of their
time sleeping while the worker's writes starved. Measured figures: benchmarks/README.md ("Submit load").
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

#: Connections per process: enough for every request the API serves at once (api_max_concurrent_requests, 40)
#: to hold its own and a second one (streamed CSV reads in a session of their own), so no request waits for the
#: pool. A wait past POOL_TIMEOUT_SECONDS is an overload and answers 503 (DatabaseBusy's handler), never 500.
POOL_SIZE = 10
MAX_OVERFLOW = 70
POOL_TIMEOUT_SECONDS = 10.0
#: How long a SQLite writer queues in the process for the write gate before it gives up (503 in the API; workers
#: retry). A writer that has the gate then waits up to SQLITE_BUSY_TIMEOUT_MS for another process (a worker).
SQLITE_WRITE_WAIT_SECONDS = 15.0
SQLITE_BUSY_TIMEOUT_MS = 30_000

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")
_GATE_HELD = "selfie_write_gate_held"


class DatabaseBusy(PoolTimeoutError):
    """The database had no room for this unit of work in time (pool exhausted, write gate queue too long).

    A subclass of SQLAlchemy's pool TimeoutError, so every handler of "waited too long for the database" (the
    API's 503, the workers' retry) treats both alike."""


class WriteGate:
    """One writer at a time per process, first come first served, with a bounded wait.

    Taken before the first write statement of a transaction (pysqlite begins the transaction there, so a writer
    waiting here holds no SQLite lock) and given back when the transaction ends or its connection is returned."""

    def __init__(self, wait_seconds: float) -> None:
        self.wait_seconds = wait_seconds
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._held = False

    def acquire(self) -> None:
        ticket = object()
        deadline = time.monotonic() + self.wait_seconds
        with self._cond:
            self._waiting.append(ticket)
            try:
                while self._held or self._waiting[0] is not ticket:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DatabaseBusy(
                            f"waited {self.wait_seconds:.0f} s for the SQLite write gate ({len(self._waiting) - 1} "
                            "writers ahead or holding it)")
                    self._cond.wait(remaining)
                self._held = True
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next ticket may be first now

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


def configure_sqlite(engine: Engine, gate: WriteGate | None) -> None:
    """The pragmas every connection gets, and the write gate (None: none, as `benchmarks/sqlite_write_bench.py`
    measures the naive way)."""
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):  # noqa: ANN001 - DB-API objects
        cursor = dbapi_connection.cursor()
        # WAL lets the API read while a worker writes; busy_timeout makes writers of other processes wait, not fail.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    if gate is None:
        return

    @event.listens_for(engine, "before_cursor_execute")
    def _take_gate(conn, _cursor, statement, _params, _context, _many):  # noqa: ANN001
        if not conn.info.get(_GATE_HELD) and statement.lstrip()[:7].upper().startswith(_WRITES):
            gate.acquire()
            conn.info[_GATE_HELD] = True

    def _give_back(info) -> None:  # noqa: ANN001
        if info.pop(_GATE_HELD, False):
            gate.release()

    # The commit/rollback events come just before the driver's commit: the next writer may meet SQLite's lock for
    # the length of one commit, which busy_timeout covers. "checkin" covers a connection returned mid-transaction.
    event.listen(engine, "commit", lambda conn: _give_back(conn.info))
    event.listen(engine, "rollback", lambda conn: _give_back(conn.info))
    event.listen(engine.pool, "checkin", lambda _dbapi, record: _give_back(record.info))


def create_db_engine(url: str) -> Engine:
    parsed = make_url(url)
    pool = {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW, "pool_timeout": POOL_TIMEOUT_SECONDS}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        if not parsed.database or parsed.database == ":memory:":
            pool = {}  # one in-memory database per connection: SQLAlchemy picks its single-connection pool
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                               **pool)
        configure_sqlite(engine, WriteGate(SQLITE_WRITE_WAIT_SECONDS))
        return engine
    # pool_pre_ping: a restarted database must not hand out dead connections to the next request.
    return create_engine(url, pool_pre_ping=True, **pool)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine (connection pool) per URL per process."""
    return create_db_engine(url)


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any error (and re-raise it)."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
