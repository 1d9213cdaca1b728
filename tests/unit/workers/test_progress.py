"""`workers.progress.BatchWatch`: the engine's cancel check and the in-flight report the heartbeat publishes."""

from __future__ import annotations

from workers.progress import BatchWatch


def keys(chunk_id: int, n: int) -> list[tuple[int, int, int, int]]:
    return [(chunk_id, 0, layer, 0) for layer in range(n)]


def test_rows_of_closed_jobs_stop_and_the_others_go_on():
    watch = BatchWatch()
    watch.hold({1: "a", 2: "b"})
    batch = keys(1, 3) + keys(2, 2)
    assert watch.should_stop(batch) == set()
    assert watch.closed({"a"}) == {"a"}
    assert watch.closed({"a"}) == set()  # found again by the next beat: not news (logged once)
    assert watch.should_stop(batch) == set(keys(1, 3))
    watch.unhold([1, 2])
    assert watch.should_stop(batch) == set()  # nothing held: a later job reusing nothing of it is untouched


def test_the_snapshot_counts_each_jobs_rows_in_the_running_batch_and_the_measured_rate():
    watch = BatchWatch()
    assert watch.snapshot() is None  # idle: nothing in flight
    watch.hold({1: "a", 2: "b"})
    watch.batch_started()
    watch.should_stop(keys(1, 3) + keys(2, 2))  # asked before the batch, with all its rows
    watch.on_step(4, 30, 5)
    watch.should_stop(keys(1, 1) + keys(2, 2))  # rows that ended early are still the batch's until it yields
    snap = watch.snapshot()
    assert snap["jobs"] == {"a": 3, "b": 2} and (snap["step"], snap["steps"]) == (4, 30)
    assert snap["chunks"] == [1, 2] and snap["rows_per_second"] is None and snap["batch_started_at"]
    watch.closed({"a"})
    watch.should_stop(keys(1, 1) + keys(2, 2))
    assert watch.snapshot()["jobs"] == {"b": 2}  # a's rows left the batch
    watch.batch_done(5)
    snap = watch.snapshot()
    assert snap["rows_per_second"] > 0 and snap["jobs"] == {} and snap["step"] == 0
