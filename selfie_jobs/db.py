"""Engine and session factories. Nothing is created at import: callers pass settings (or a URL).

Connection pools are per process (`get_engine` caches one engine per URL). On SQLite, writers of one process wait
for an in-process write gate (`WriteGate`) instead of polling the file lock: SQLite lets one writer at a time in
and its busy handler makes the others sleep and retry, so 40 API threads fighting for the lock kept a worker's
writes waiting and let a writer wait for seconds; with the gate the worker's writes go through, a writer's wait is
bounded (DatabaseBusy, a 503), and the API's peak write rate is lower but far above what it submits.
Measured figures: benchmarks/README.md ("Submit load").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from selfie_jobs.float_arrays import register_float4_arrays

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


class DatabaseBusy(PoolTimeoutError):
    """The database had no room for this unit of work in time (pool exhausted, write gate queue too long).

    A subclass of SQLAlchemy's pool TimeoutError, so every handler of "waited too long for the database" (the
    API's 503, the workers' retry) treats both alike."""


class WriteGate:
    """One writer at a time per process, with a bounded wait."""

    def __init__(self, wait_seconds: float) -> None:
        self.wait_seconds = wait_seconds
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self._lock.acquire(timeout=self.wait_seconds):
            raise DatabaseBusy(f"waited {self.wait_seconds:.0f} s for the SQLite write gate")

    def release(self) -> None:
        self._lock.release()


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

    holders: set[int] = set()  # ids of the DB-API connections that hold the gate

    @event.listens_for(engine, "before_cursor_execute")
    def _take_gate(conn, _cursor, statement, _params, _context, _many):  # noqa: ANN001
        key = id(conn.connection.dbapi_connection)
        if key not in holders and statement.lstrip()[:7].upper().startswith(_WRITES):
            gate.acquire()
            holders.add(key)

    def _give_back(dbapi_connection) -> None:  # noqa: ANN001
        if id(dbapi_connection) in holders:
            holders.discard(id(dbapi_connection))
            gate.release()

    # Given back after the driver's commit or rollback has released SQLite's lock (SQLAlchemy's commit event comes
    # before it, and the next writer then met the lock and slept in SQLite's busy handler), and when a connection
    # goes back to the pool (it is rolled back there) or is closed.
    dialect = engine.dialect
    do_commit, do_rollback = dialect.do_commit, dialect.do_rollback

    def commit_then_give_back(dbapi_connection) -> None:  # noqa: ANN001
        try:
            do_commit(dbapi_connection)
        finally:
            _give_back(dbapi_connection)

    def rollback_then_give_back(dbapi_connection) -> None:  # noqa: ANN001
        try:
            do_rollback(dbapi_connection)
        finally:
            _give_back(dbapi_connection)

    dialect.do_commit = commit_then_give_back  # this engine's own dialect instance
    dialect.do_rollback = rollback_then_give_back
    event.listen(engine.pool, "checkin", lambda dbapi_connection, _record: _give_back(dbapi_connection))
    event.listen(engine.pool, "close", lambda dbapi_connection, _record: _give_back(dbapi_connection))


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
    # jit=off: PostgreSQL compiles any query it costs high, as the text filter's scan of a 100,000-row job is, and
    # the compiling took longer than it saved (about 90 of 520 ms, benchmarks/README.md "Reads at scale"); the
    # service's queries are short OLTP reads and writes.
    given = parsed.query.get("options")  # options in the URL are kept, jit=off added to them
    options = f"{given} -c jit=off" if isinstance(given, str) and given else "-c jit=off"
    engine = create_engine(url, pool_pre_ping=True, connect_args={"options": options}, **pool)
    # the write path's relevancy lists go as one float4 array in binary (selfie_jobs.bulk)
    event.listen(engine, "connect", lambda dbapi_connection, _record: register_float4_arrays(dbapi_connection.adapters))
    return engine


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
