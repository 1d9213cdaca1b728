"""The writer hand-off (`workers.writer.WriteBehind`) with fake sinks: order, bound, errors, and the batcher's use
of it (the engine's next batch starts while the previous batch's rows are being stored)."""

from __future__ import annotations

import threading

import pytest

from selfie_jobs.chunks import ClaimedChunk, WriteOutcome
from tests.unit.workers.test_batcher import FakeRunner
from workers import batcher
from workers.writer import WriteBehind


class GatedSink:
    """Records writes; each write waits until the test opens the gate."""

    def __init__(self, fail_on: int | None = None):
        self.gate = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.writes: list[tuple[int, int, bool]] = []
        self.fail_on = fail_on

    def write(self, chunk_id, rows, complete):
        self.started.release()
        assert self.gate.acquire(timeout=10), "the test never let this write through"
        if self.fail_on is not None and len(self.writes) == self.fail_on:
            self.writes.append((chunk_id, len(rows), complete))
            raise RuntimeError("database gone for good")
        self.writes.append((chunk_id, len(rows), complete))
        return WriteOutcome(len(rows), complete, "running")


def test_writes_are_made_in_the_order_they_were_handed_over():
    sink = GatedSink()
    for _ in range(5):
        sink.gate.release()
    writer = WriteBehind(sink, depth=2)
    for step in range(5):
        writer.submit(1 + step % 2, [object()] * step, step >= 3)
    writer.close()
    assert sink.writes == [(1, 0, False), (2, 1, False), (1, 2, False), (2, 3, True), (1, 4, True)]
    assert [w.chunk_id for w in writer.written()] == [1, 2, 1, 2, 1]


def test_the_hand_off_is_bounded_and_submit_waits_for_room():
    sink = GatedSink()
    writer = WriteBehind(sink, depth=2, poll_seconds=0.01)
    writer.submit(1, [], False)
    assert sink.started.acquire(timeout=5)  # the writer is inside write 1
    writer.submit(2, [], False)
    writer.submit(3, [], False)  # two waiting: the bound
    fourth = threading.Thread(target=writer.submit, args=(4, [], False))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive(), "a third waiting write was taken although the hand-off was full"
    sink.gate.release()  # write 1 finishes, write 2 starts: room for the fourth
    fourth.join(5)
    assert not fourth.is_alive()
    for _ in range(3):
        sink.gate.release()
    writer.close()
    assert [w[0] for w in sink.writes] == [1, 2, 3, 4]


def test_a_failed_write_is_raised_to_the_scheduler_and_nothing_after_it_is_written():
    sink = GatedSink(fail_on=1)
    writer = WriteBehind(sink, depth=4, poll_seconds=0.01)
    writer.submit(1, [1, 2], False)
    writer.submit(1, [3], False)  # fails
    writer.submit(1, [], True)  # must never run: the chunk's rows did not all commit
    for _ in range(3):
        sink.gate.release()
    with pytest.raises(RuntimeError, match="database gone"):
        writer.close()
    assert sink.writes == [(1, 2, False), (1, 1, False)]
    assert [w.chunk_id for w in writer.written()] == [1]


def test_submit_raises_the_writers_error_instead_of_waiting_for_room():
    sink = GatedSink(fail_on=0)
    writer = WriteBehind(sink, depth=1, poll_seconds=0.01)
    writer.submit(1, [], False)
    sink.gate.release()
    with pytest.raises(RuntimeError, match="database gone"):
        for _ in range(100):  # one of these finds the error (the writer drops what waits)
            writer.submit(2, [], False)
    writer.abandon()


def test_abandon_drops_waiting_writes_and_lets_the_one_under_way_finish():
    sink = GatedSink()
    writer = WriteBehind(sink, depth=3, poll_seconds=0.01)
    writer.submit(1, [], False)
    assert sink.started.acquire(timeout=5)
    writer.submit(2, [], False)
    writer.submit(3, [], True)
    closing = threading.Thread(target=writer.abandon)
    closing.start()
    closing.join(0.2)
    sink.gate.release()
    closing.join(5)
    assert not closing.is_alive() and sink.writes == [(1, 0, False)]


def _plan(chunks: int, size: int) -> batcher.BatchPlan:
    claimed = [ClaimedChunk(id=c, job_id=f"job{c}", index=0, model="m", batch_key="k", priority=5,
                            items=tuple((0, 0, t) for t in range(size)), attempts=1) for c in range(1, chunks + 1)]
    items = [batcher.WorkItem((c.id, *item), c.job_id, "p") for c in claimed for item in c.items]
    return batcher.BatchPlan("k", {}, claimed, items)


class WatchedRunner(FakeRunner):
    """Yields batches and records, for each batch, how many writes the sink had finished when it was computed."""

    def __init__(self, sink: GatedSink, batch: int):
        super().__init__(batch=batch)
        self.sink = sink
        self.finished_writes_at_batch: list[int] = []

    def stream(self, items, spec):
        for results in super().stream(items, spec):
            self.finished_writes_at_batch.append(len(self.sink.writes))
            yield results


def test_the_next_engine_batch_runs_while_the_previous_rows_are_being_stored():
    sink = GatedSink()
    runner = WatchedRunner(sink, batch=2)
    plan = _plan(chunks=3, size=2)  # three engine batches, one chunk each
    done = threading.Thread(target=lambda: stats.append(batcher.execute(plan, runner, sink)))
    stats: list[batcher.ExecutionStats] = []
    done.start()
    assert sink.started.acquire(timeout=5)  # chunk 1's write is under way and held ...
    for _ in range(100):
        if len(runner.finished_writes_at_batch) == 3:
            break
        done.join(0.05)
    assert runner.finished_writes_at_batch == [0, 0, 0]  # ... and every batch was computed without waiting for it
    assert done.is_alive()  # execute returns only when the writes have committed
    for _ in range(3):
        sink.gate.release()
    done.join(5)
    assert not done.is_alive()
    assert sink.writes == [(1, 2, True), (2, 2, True), (3, 2, True)]
    assert sorted(stats[0].chunks_done) == [1, 2, 3] and stats[0].inserted == 6


def test_a_write_error_stops_the_run_and_is_raised_by_execute():
    sink = GatedSink(fail_on=0)
    runner = FakeRunner(batch=2)
    for _ in range(10):
        sink.gate.release()
    with pytest.raises(RuntimeError, match="database gone"):
        batcher.execute(_plan(chunks=3, size=2), runner, sink)
    assert sink.writes == [(1, 2, True)]


class GroupingSink(GatedSink):
    """A GatedSink that can also store several writes in one transaction: records each group it was given."""

    def __init__(self, fail_group: int | None = None):
        super().__init__()
        self.groups: list[list[int]] = []
        self.fail_group = fail_group

    def write(self, chunk_id, rows, complete):
        self.groups.append([chunk_id])
        return super().write(chunk_id, rows, complete)

    def write_many(self, writes):
        self.started.release()
        assert self.gate.acquire(timeout=10), "the test never let this write through"
        self.groups.append([w[0] for w in writes])
        if self.fail_group is not None and len(self.groups) - 1 == self.fail_group:
            raise RuntimeError("database gone for good")
        self.writes.extend((c, len(rows), complete) for c, rows, complete in writes)
        return [WriteOutcome(len(rows), complete, "running") for _, rows, complete in writes]


def test_writes_of_one_job_that_wait_together_are_committed_in_one_transaction():
    sink = GroupingSink()
    writer = WriteBehind(sink, depth=8, poll_seconds=0.01)
    writer.submit(1, [object()], True, group="a")
    assert sink.started.acquire(timeout=5)  # the writer is inside the first write; the next ones wait behind it
    writer.submit(2, [object()], False, group="a")
    writer.submit(2, [object()], True, group="a")
    writer.submit(3, [object()], True, group="b")  # another job: a transaction of its own
    writer.submit(4, [object()], True, group="a")
    writer.submit(5, [object()], True)  # no group: alone
    for _ in range(5):
        sink.gate.release()
    writer.close()
    assert sink.groups == [[1], [2, 2], [3], [4], [5]]
    assert sink.writes == [(1, 1, True), (2, 1, False), (2, 1, True), (3, 1, True), (4, 1, True), (5, 1, True)]
    assert [(w.chunk_id, w.complete) for w in writer.written()] == [(1, True), (2, False), (2, True), (3, True),
                                                                     (4, True), (5, True)]


def test_a_group_that_fails_reports_none_of_its_writes_and_nothing_after_it_is_written():
    sink = GroupingSink(fail_group=1)
    writer = WriteBehind(sink, depth=8, poll_seconds=0.01)
    writer.submit(1, [object()], True, group="a")
    assert sink.started.acquire(timeout=5)
    writer.submit(2, [object()], False, group="a")
    writer.submit(2, [object()], True, group="a")  # in the failing group: its completion is not reported
    writer.submit(3, [object()], True, group="b")  # after the failure: never written
    for _ in range(3):
        sink.gate.release()
    with pytest.raises(RuntimeError, match="database gone"):
        writer.close()
    assert sink.groups == [[1], [2, 2]]
    assert [w.chunk_id for w in writer.written()] == [1]


class RecordingSink:
    def __init__(self):
        self.writes = []
        self.threads = set()

    def write(self, chunk_id, rows, complete):
        self.writes.append((chunk_id, list(rows), complete))
        self.threads.add(threading.current_thread().name)
        return WriteOutcome(len(rows), complete, "running")


def test_the_writer_thread_makes_the_rows_from_what_it_is_handed():
    sink = RecordingSink()
    made_in = set()

    def rows_from(result):
        made_in.add(threading.current_thread().name)
        return f"row {result}"

    writer = WriteBehind(sink, depth=2, rows_from=rows_from)
    writer.submit(1, [10, 11], False)
    writer.submit(1, [12], True)
    writer.close()
    assert sink.writes == [(1, ["row 10", "row 11"], False), (1, ["row 12"], True)]
    assert made_in == sink.threads == {"selfie-writer"}  # off the engine's thread


def test_rows_that_cannot_be_made_stop_the_writer_like_a_failed_write():
    sink = RecordingSink()

    def rows_from(result):
        if result == "bad":
            raise ValueError("not a result")
        return result

    writer = WriteBehind(sink, depth=2, rows_from=rows_from)
    writer.submit(1, ["ok"], False)
    writer.submit(1, ["bad"], False)
    with pytest.raises(ValueError, match="not a result"):
        writer.submit(1, ["ok"], True)  # a completion must not follow rows that were never stored
        writer.close()
    assert sink.writes == [(1, ["ok"], False)]
