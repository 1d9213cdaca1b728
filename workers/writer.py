"""The writer thread that stores one engine batch's rows while the engine computes the next.

`WriteBehind` keeps the guarantees of a synchronous write: writes are made one at a time in the order they were
handed over (a chunk's rows before its completion), a chunk is done only when the transaction that marks it has
committed, and a worker killed with writes in flight loses nothing, because an uncommitted chunk stays `running`
and is run again (its committed rows are skipped by the unique key). The hand-off is bounded (`depth` writes
waiting), so a writer that falls behind slows the engine down instead of holding rows without limit; the
worker's heartbeat thread renews the chunks' leases all the while. The first write that fails stops the writer:
later writes are dropped (a completion must never follow rows that did not commit) and the error is raised to the
scheduler at its next hand-off or at `close`.

Writes that wait together are committed together: when the writer finds more writes of the same job waiting (it
fell behind: the engine was faster than one commit per write), it stores them in one transaction through the
sink's `write_many`, so a run costs one commit per group of writes instead of one per write (a commit's WAL flush
was most of a write's time on PostgreSQL, benchmarks/README.md "Database cycle"). Every write of the group commits
or none does; what the writer reports comes after the commit. A group holds one job's writes only, so its
transaction takes one job's row lock at most (`selfie_jobs.writes.write_many`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from selfie_jobs.chunks import WriteOutcome

log = logging.getLogger(__name__)

#: Writes waiting for the writer thread at most: one engine batch's writes being stored while the next ones wait
#: is what hides the database behind compute; more would only hold more rows in memory.
WRITE_DEPTH = 4


@dataclass(frozen=True)
class Written:
    """A write the writer thread has committed, for the scheduler to account for."""

    chunk_id: int
    complete: bool
    outcome: WriteOutcome


_STOP = object()


class WriteBehind:
    """A bounded hand-off of `sink.write` calls to one writer thread (see the module docstring)."""

    def __init__(self, sink: Any, depth: int = WRITE_DEPTH, *, poll_seconds: float = 0.1,
                 rows_from: Callable[[Any], Any] | None = None):
        self.sink = sink
        self.rows_from = rows_from
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._written: deque[Written] = deque()
        self._error: BaseException | None = None
        self._abandoned = False  # writes taken from the hand-off after `abandon` are dropped, carried ones too
        self._poll = poll_seconds
        self._thread = threading.Thread(target=self._run, name="selfie-writer", daemon=True)
        self._thread.start()

    def submit(self, chunk_id: int, rows: Sequence[Any], complete: bool, *, group: Any = None) -> None:
        """Hand a write over; blocks while `depth` writes wait. Raises the writer's error, if it had one. With
        `rows_from`, `rows` are what it turns into rows, in the writer thread (the engine's results: making rows of
        them is Python work the engine's thread no longer waits for).

        `group` (the chunk's job): consecutive waiting writes of one group may be committed in one transaction, if
        the sink can (`write_many`); None: this write is committed alone."""
        while True:
            self.raise_error()
            try:
                self._queue.put((chunk_id, rows, complete, group), timeout=self._poll)
                return
            except queue.Full:
                continue

    def written(self) -> list[Written]:
        """The writes committed since the last call, in order."""
        out = []
        while self._written:
            out.append(self._written.popleft())
        return out

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait until every write handed over has committed; raises the writer's error, if it had one."""
        self._put_stop()
        self._thread.join()
        self.raise_error()

    def abandon(self) -> None:
        """On the way out after an error elsewhere: writes not started are dropped, the one under way finishes
        (its transaction commits or rolls back whole). Its own error, if any, is logged: the first one is raised."""
        self._abandoned = True
        self._drop_waiting()
        self._put_stop()
        self._thread.join()
        if self._error is not None:
            log.warning("the writer had also failed: %s", self._error)

    # -- the writer thread ----------------------------------------------------------------------------------
    def _rows(self, items: Sequence[Any]) -> Sequence[Any]:
        return [self.rows_from(item) for item in items] if self.rows_from is not None else items

    def _put_stop(self) -> None:
        while True:
            try:
                self._queue.put(_STOP, timeout=self._poll)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    return

    def _drop_waiting(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _next_group(self, carried: list[Any]) -> list[Any]:
        """The next write, and the writes of its group that wait behind it (the first other one is carried over)."""
        first = carried.pop() if carried else self._queue.get()
        group = [first]
        if first is _STOP or first[3] is None or not hasattr(self.sink, "write_many"):
            return group
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return group
            if item is _STOP or item[3] != first[3]:
                carried.append(item)
                return group
            group.append(item)

    def _run(self) -> None:
        carried: list[Any] = []
        while True:
            group = self._next_group(carried)
            if group[0] is _STOP:
                return
            if self._error is not None or self._abandoned:
                continue  # after a failed write nothing more is written (a completion must not follow lost rows)
            try:
                writes = [(chunk_id, self._rows(rows), complete) for chunk_id, rows, complete, _ in group]
            except BaseException as exc:  # noqa: BLE001 - handed to the scheduler's thread, raised there
                log.error("making rows of chunks %s failed: %s", sorted({w[0] for w in group}), exc)
                self._error = exc
                continue
            try:
                if len(writes) == 1:
                    outcomes = [self.sink.write(*writes[0])]
                else:
                    outcomes = self.sink.write_many(writes)
            except BaseException as exc:  # noqa: BLE001 - handed to the scheduler's thread, raised there
                log.error("writing %d rows of chunks %s failed: %s", sum(len(w[1]) for w in writes),
                          sorted({w[0] for w in writes}), exc)
                self._error = exc
                continue
            for (chunk_id, _, complete), outcome in zip(writes, outcomes):
                self._written.append(Written(chunk_id, complete, outcome))
