"""Force one interleaving of two transactions on a real database, with no sleeps.

The test holds a transaction open on its own engine and runs the other party in a thread on an engine that only
that party uses (a session of its own, or the live server's). `LockStep.start()` returns once that party is about
to run its first statement that takes a lock (a write, or a SELECT with a locking clause: FOR UPDATE, FOR NO KEY
UPDATE, FOR SHARE), or has finished without one. Whatever it read before that point, it read before the test's
transaction commits; whatever it does after, it cannot finish before the test commits, because the test's
transaction holds the lock it needs (SQLite's write lock, or PostgreSQL's row or unique-key lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event


def takes_lock(statement: str) -> bool:
    sql = statement.lstrip().upper()
    return sql.startswith(("INSERT", "UPDATE", "DELETE")) or any(
        clause in sql for clause in ("FOR UPDATE", "FOR NO KEY UPDATE", "FOR SHARE", "FOR KEY SHARE"))


class LockStep:
    def __init__(self, engine: Engine, work: Callable[[], Any]):
        self.engine = engine
        self.work = work
        self.reached = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _watch(self, _conn, _cursor, statement, *_args) -> None:
        if takes_lock(statement):
            self.reached.set()

    def _run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test by join()
            self.error = exc
        finally:
            self.reached.set()

    def start(self) -> LockStep:
        event.listen(self.engine, "before_cursor_execute", self._watch)
        self.thread.start()
        assert self.reached.wait(30), "the other transaction never got to a locking statement"
        return self

    def join(self) -> Any:
        """The work's result (its exception re-raised), once it has finished."""
        self.thread.join(60)
        event.remove(self.engine, "before_cursor_execute", self._watch)
        assert not self.thread.is_alive(), "the other transaction is still blocked"
        if self.error is not None:
            raise self.error
        return self.result
