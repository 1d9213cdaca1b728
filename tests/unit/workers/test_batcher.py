"""The batcher's scheduling and failure policy, with a fake runner and an in-memory sink (no torch, no DB)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from selfie_jobs.chunks import ClaimedChunk, WriteOutcome
from workers import batcher


class InputError(ValueError):
    pass


class OOM(RuntimeError):
    pass


@dataclass
class Result:
    key: tuple
    source_token: str = "x"
    text: str = "t"
    token_ids: list = field(default_factory=lambda: [1])
    relevancy: list = field(default_factory=lambda: [0.5])
    mean_relevancy: float = 0.5


@dataclass
class FakeRunner:
    batch: int = 2
    oom_above: int | None = None  # a stream of more items than this runs out of memory
    bad_prompt: str | None = None  # validation rejects it
    nan_prompt: str | None = None  # results for it are NaN
    crash: Exception | None = None
    calls: list[int] = field(default_factory=list)

    def validate(self, items, spec):
        if any(i.prompt == self.bad_prompt for i in items):
            raise InputError("prompt is pathological")

    def stream(self, items, spec):
        self.calls.append(len(items))
        if self.crash is not None:
            raise self.crash
        if self.oom_above is not None and len(items) > self.oom_above:
            raise OOM("CUDA out of memory")
        for start in range(0, len(items), self.batch):
            part = items[start : start + self.batch]
            yield [Result(i.key, mean_relevancy=float("nan") if i.prompt == self.nan_prompt else 0.5) for i in part]

    def is_input_error(self, exc):
        return isinstance(exc, InputError)

    def is_out_of_memory(self, exc):
        return isinstance(exc, OOM)

    def is_device_failure(self, exc):
        return "device-side assert" in str(exc)

    def free_memory(self):
        pass


@dataclass
class MemorySink:
    rows: dict = field(default_factory=dict)
    done: list = field(default_factory=list)
    writes: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    cancelled_jobs: set = field(default_factory=set)
    job_of: dict = field(default_factory=dict)

    def write(self, chunk_id, rows, complete):
        self.writes.append((chunk_id, len(rows), complete))
        if self.job_of[chunk_id] in self.cancelled_jobs:
            return WriteOutcome(0, False, "cancelled", "job is cancelled")
        new = 0
        for r in rows:
            key = (self.job_of[chunk_id], r.prompt_index, r.layer, r.token)
            if key not in self.rows:
                self.rows[key] = r
                new += 1
        if complete:
            self.done.append(chunk_id)
        return WriteOutcome(new, complete, "running")

    def fail_job(self, job_id, error):
        self.failed[job_id] = error


def chunk(cid, job, items):
    return ClaimedChunk(id=cid, job_id=job, index=0, model="m", batch_key="k", priority=5, items=tuple(items),
                        attempts=1, spec={})


def setup(*jobs):
    """jobs: (job id, prompt, n items); two chunks per job."""
    chunks, prompts, cid = [], {}, 0
    for job, prompt, n in jobs:
        prompts[(job, 0)] = prompt
        items = [(0, layer, 0) for layer in range(n)]
        half = n // 2
        for part in (items[:half], items[half:]):
            cid += 1
            chunks.append(chunk(cid, job, part))
    plans = batcher.plan_batches(chunks, prompts)
    assert len(plans) == 1
    sink = MemorySink(job_of={c.id: c.job_id for c in chunks})
    return plans[0], sink


def test_one_plan_for_chunks_of_several_jobs_streamed_per_engine_batch():
    plan, sink = setup(("a", "p1", 4), ("b", "p2", 4))
    runner = FakeRunner(batch=3)
    stats = batcher.execute(plan, runner, sink)
    assert runner.calls == [8]  # one engine run for both jobs
    assert stats.engine_batches == 3 and stats.inserted == 8
    assert sorted(sink.done) == [1, 2, 3, 4]
    # chunk 2 is split over the first two engine batches: written twice, completed by the second write
    assert [w for w in sink.writes if w[0] == 2] == [(2, 1, False), (2, 1, True)]


def test_out_of_memory_splits_in_halves_until_it_fits():
    plan, sink = setup(("a", "p1", 4), ("b", "p2", 4))
    runner = FakeRunner(batch=8, oom_above=2)
    stats = batcher.execute(plan, runner, sink)
    assert runner.calls[:3] == [8, 4, 2] and stats.splits == 3
    assert len(sink.rows) == 8 and sorted(sink.done) == [1, 2, 3, 4] and not sink.failed


def test_a_job_the_engine_rejects_fails_and_the_others_go_on():
    plan, sink = setup(("a", "bad", 4), ("b", "p2", 4))
    stats = batcher.execute(plan, FakeRunner(bad_prompt="bad"), sink)
    assert list(sink.failed) == ["a"] and "pathological" in sink.failed["a"]
    assert stats.failed_jobs.keys() == {"a"}
    assert sorted(sink.done) == [3, 4] and all(k[0] == "b" for k in sink.rows)


def test_non_finite_results_fail_their_job_only():
    plan, sink = setup(("a", "p1", 4), ("b", "nan", 4))
    batcher.execute(plan, FakeRunner(nan_prompt="nan"), sink)
    assert list(sink.failed) == ["b"] and "non-finite" in sink.failed["b"]
    assert sorted(sink.done) == [1, 2]


def test_runtime_input_error_is_isolated_per_job():
    plan, sink = setup(("a", "p1", 2), ("b", "p2", 2))

    class Picky(FakeRunner):
        def stream(self, items, spec):
            if any(i.job_id == "b" for i in items):
                raise InputError("vector is NaN")
            return super().stream(items, spec)

    batcher.execute(plan, Picky(), sink)
    assert list(sink.failed) == ["b"] and sorted(sink.done) == [1, 2]


def test_cancelled_job_stops_being_written():
    plan, sink = setup(("a", "p1", 4), ("b", "p2", 4))
    sink.cancelled_jobs.add("a")
    stats = batcher.execute(plan, FakeRunner(batch=2), sink)
    assert "a" in stats.closed_jobs and sorted(sink.done) == [3, 4]


def test_rows_a_cancel_dropped_from_the_engine_close_their_chunks_instead_of_failing_the_run():
    """The engine stops a cancelled job's rows (no results for them); the run ends without error, the job's chunks
    are closed by a write of nothing, and the other job's rows are all written."""
    plan, sink = setup(("a", "p1", 4), ("b", "p2", 4))

    class Preempting(FakeRunner):
        def stream(self, items, spec):
            sink.cancelled_jobs.add("a")  # cancelled while the batch runs: its rows leave before any is yielded
            return super().stream([i for i in items if i.job_id != "a"], spec)

    stats = batcher.execute(plan, Preempting(batch=8), sink)
    assert stats.closed_jobs == {"a"} and sorted(sink.done) == [3, 4] and len(sink.rows) == 4
    assert (1, 0, False) in sink.writes  # asked whether job a is still open: it is not


def test_rows_missing_from_an_open_job_are_still_an_error():
    plan, sink = setup(("a", "p1", 4))

    class Lossy(FakeRunner):
        def stream(self, items, spec):
            return super().stream(items[:-1], spec)

    with pytest.raises(RuntimeError, match="no result for 1 items"):
        batcher.execute(plan, Lossy(batch=8), sink)


def test_device_failure_is_raised_for_the_process_to_exit():
    plan, sink = setup(("a", "p1", 2))
    with pytest.raises(batcher.DeviceFailure):
        batcher.execute(plan, FakeRunner(crash=RuntimeError("CUDA error: device-side assert triggered")), sink)


def test_other_errors_propagate():
    plan, sink = setup(("a", "p1", 2))
    with pytest.raises(KeyError):
        batcher.execute(plan, FakeRunner(crash=KeyError("bug")), sink)


def test_missing_prompt_is_an_error():
    with pytest.raises(LookupError):
        batcher.plan_batches([chunk(1, "a", [(3, 0, 0)])], {("a", 0): "p"})
