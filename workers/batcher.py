"""The scheduler side of a worker: claimed chunks -> engine work items -> results back per chunk.

It decides *what* runs together and what happens on failure; *how* a batch runs is the runner's business (the
resident engine, one runner per job kind in `workers.runners`), and where results go is the sink's
(`workers.sink.DbSink`). What a kind's items, inputs and rows are is the kind's (`selfie_jobs.kinds`): a plan holds
chunks of one kind and one batch key only.
Only plain data crosses these boundaries, so this module imports neither torch nor SQLAlchemy sessions, and
its failure handling is unit-tested with a fake runner.

Failure policy:
- a job whose input the engine rejects (SelfieInputError, non-finite results) fails with a stored error; the
  other jobs of the batch run on without it;
- out of memory: the batch is split in halves and each half retried (recursively), only for what is not done;
- a device failure (CUDA device-side error) raises `DeviceFailure`: the process must be replaced;
- a write that fails (past the database retry window) stops the run: its error is raised and the chunks go back.

Writes overlap compute: each finished engine batch's rows go to a writer thread (`workers.writer.WriteBehind`) and
the engine starts its next batch at once; `execute` returns when every write has committed, `start` when the engine
is done (the last writes may still be committing: `Started.wait`). What the writer finds
(a job cancelled meanwhile) reaches the scheduler one batch later, which only costs that batch's compute.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from selfie_jobs.chunks import ClaimedChunk, WriteOutcome
from selfie_jobs.kinds import DEFAULT_KIND, get_kind
from workers.writer import WRITE_DEPTH, WriteBehind

log = logging.getLogger(__name__)

#: (chunk id, *item): unique within one engine run (interpret: (chunk, prompt index, layer, token); vectors:
#: (chunk, vector index)).
Key = tuple[int, ...]


class DeviceFailure(RuntimeError):
    """The accelerator is in an unusable state (CUDA context lost); the worker process must exit."""


@dataclass(frozen=True)
class WorkItem:
    key: Key
    job_id: str
    prompt: str  # the prompt (interpret) or the vector's label (vectors)
    payload: Any = None  # what else the kind's runner needs (vectors: the values or the expression)

    @property
    def chunk_id(self) -> int:
        return self.key[0]


@dataclass
class BatchPlan:
    """Chunks that share kind, model and engine settings (batch_key), and the engine items they stand for."""

    batch_key: str
    spec: dict[str, Any]
    chunks: list[ClaimedChunk]
    items: list[WorkItem]
    kind: str = DEFAULT_KIND


@dataclass
class ExecutionStats:
    items: int = 0
    inserted: int = 0
    engine_batches: int = 0
    splits: int = 0
    chunks_done: list[int] = field(default_factory=list)
    failed_jobs: dict[str, str] = field(default_factory=dict)
    closed_jobs: set[str] = field(default_factory=set)


class Runner(Protocol):
    """How a batch runs: implemented by the resident engine (and by fakes in tests)."""

    def validate(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> None: ...

    def stream(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> Iterator[list[Any]]: ...

    def is_input_error(self, exc: BaseException) -> bool: ...

    def is_out_of_memory(self, exc: BaseException) -> bool: ...

    def is_device_failure(self, exc: BaseException) -> bool: ...

    def free_memory(self) -> None: ...


class Sink(Protocol):
    """Where results go: one transaction per write (and the job's failure). A sink may also have
    `write_many(writes) -> outcomes`: several writes `(chunk id, rows, complete)` of one job in one transaction,
    which the writer thread uses when writes wait (`workers.writer`)."""

    def write(self, chunk_id: int, rows: Sequence[Any], complete: bool) -> WriteOutcome: ...

    def fail_job(self, job_id: str, error: str) -> None: ...


def plan_batches(chunks: Sequence[ClaimedChunk], inputs: dict[Any, Any]) -> list[BatchPlan]:
    """Group claimed chunks by kind and batch_key (one engine run per group) and expand them into work items;
    `inputs` is what the chunks' kinds loaded for them (`JobKind.load_inputs`: prompts, vectors)."""
    plans: dict[tuple[str, str], BatchPlan] = {}
    for chunk in chunks:
        kind = get_kind(chunk.kind)
        plan = plans.setdefault((chunk.kind, chunk.batch_key),
                                BatchPlan(chunk.batch_key, chunk.spec, [], [], kind=chunk.kind))
        plan.chunks.append(chunk)
        for work in kind.work_inputs(chunk, inputs):
            plan.items.append(WorkItem((chunk.id, *work.item), chunk.job_id, work.text, work.payload))
    return list(plans.values())


def _finite(value: Any) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))


def _all_finite(values: Sequence[Any]) -> bool:
    try:
        if math.isfinite(sum(values)):
            return True
    except (TypeError, OverflowError):
        pass
    return all(_finite(v) for v in values)


class _Execution:
    def __init__(self, plan: BatchPlan, runner: Runner, sink: Sink, writer: WriteBehind):
        self.plan = plan
        self.runner = runner
        self.sink = sink
        self.writer = writer
        self.kind = get_kind(plan.kind)
        self.stats = ExecutionStats(items=len(plan.items))
        self.job_of = {c.id: c.job_id for c in plan.chunks}
        self.remaining: dict[int, set[Key]] = {c.id: set() for c in plan.chunks}
        for item in plan.items:
            self.remaining[item.chunk_id].add(item.key)
        self.completed: set[int] = set()

    # -- helpers --------------------------------------------------------------------------------------------
    def pending(self, items: Sequence[WorkItem]) -> list[WorkItem]:
        closed = self.stats.closed_jobs
        return [i for i in items if i.job_id not in closed and i.key in self.remaining[i.chunk_id]]

    def fail_job(self, job_id: str, error: str) -> None:
        if job_id in self.stats.closed_jobs:
            return
        log.warning("job %s fails: %s", job_id, error)
        self.sink.fail_job(job_id, error)
        self.stats.failed_jobs[job_id] = error
        self.stats.closed_jobs.add(job_id)

    # -- steps ----------------------------------------------------------------------------------------------
    def validate_per_job(self) -> None:
        by_job: dict[str, list[WorkItem]] = defaultdict(list)
        for item in self.plan.items:
            by_job[item.job_id].append(item)
        for job_id, items in by_job.items():
            try:
                self.runner.validate(items, self.plan.spec)
            except Exception as exc:
                if not self.runner.is_input_error(exc):
                    raise
                self.fail_job(job_id, f"the engine rejected this job's input: {exc}")

    def account(self) -> None:
        """Take in what the writer has committed: rows inserted, chunks done, jobs found closed."""
        for written in self.writer.written():
            self.stats.inserted += written.outcome.inserted
            if written.outcome.skipped_reason:
                # cancelled (or failed elsewhere): stop spending time on it
                self.stats.closed_jobs.add(self.job_of[written.chunk_id])
            if written.complete and written.outcome.chunk_done:
                self.stats.chunks_done.append(written.chunk_id)

    def deliver(self, results: Sequence[Any]) -> None:
        self.account()
        by_chunk: dict[int, list[Any]] = defaultdict(list)
        for result in results:
            chunk_id = result.key[0]
            job_id = self.job_of.get(chunk_id)
            if job_id is None or job_id in self.stats.closed_jobs:
                continue
            values = [result.mean_relevancy, *result.relevancy]
            # one sum in C first (NaN and infinities make it not finite); the test per value only when it is not
            if not _all_finite(values):
                self.fail_job(job_id, f"the engine produced non-finite relevancy (NaN/inf) for "
                                      f"{self.kind.describe(result.key[1:])}: the hidden state or model output is "
                                      "not finite")
                continue
            by_chunk[chunk_id].append(result)
        for chunk_id, results in by_chunk.items():
            job_id = self.job_of[chunk_id]
            if job_id in self.stats.closed_jobs:
                continue
            self.remaining[chunk_id].difference_update(r.key for r in results)
            complete = not self.remaining[chunk_id]
            # made into rows and stored by the writer thread while the engine computes its next batch
            self.writer.submit(chunk_id, results, complete, group=job_id)
            if complete:
                self.completed.add(chunk_id)

    def run(self, items: Sequence[WorkItem]) -> None:
        items = self.pending(items)
        if not items:
            return
        try:
            for results in self.runner.stream(items, self.plan.spec):
                self.stats.engine_batches += 1
                self.deliver(results)
        except DeviceFailure:
            raise
        except Exception as exc:
            if self.runner.is_device_failure(exc):
                raise DeviceFailure(str(exc)) from exc
            left = self.pending(items)
            if self.runner.is_out_of_memory(exc):
                self.runner.free_memory()
                if len(left) <= 1:
                    for job_id in {i.job_id for i in left}:
                        self.fail_job(job_id, f"out of memory even for a single interpretation: {exc}")
                    return
                self.stats.splits += 1
                half = len(left) // 2
                log.warning("out of memory on %d items; retrying as %d + %d", len(left), half, len(left) - half)
                self.run(left[:half])
                self.run(left[half:])
                return
            if self.runner.is_input_error(exc):
                jobs = list(dict.fromkeys(i.job_id for i in left))
                if len(jobs) == 1:
                    self.fail_job(jobs[0], f"the engine rejected this job's input: {exc}")
                    return
                for job_id in jobs:  # isolate the job that fails; the others go on
                    self.run([i for i in left if i.job_id == job_id])
                return
            raise

    def closed_meanwhile(self, chunk: ClaimedChunk) -> bool:
        """Whether the chunk's job was closed while the batch ran: the runner then stops its rows (a cancel), and
        the write of nothing closes the chunk as the job's state says."""
        outcome = self.sink.write(chunk.id, [], False)
        if outcome.skipped_reason:
            self.stats.closed_jobs.add(chunk.job_id)
            return True
        return False

    def finish(self) -> None:
        # chunks whose every item is written but which were never marked (e.g. an empty chunk)
        for chunk in self.plan.chunks:
            if chunk.id in self.completed or chunk.job_id in self.stats.closed_jobs:
                continue
            if self.remaining[chunk.id]:
                if self.closed_meanwhile(chunk):
                    continue
                raise RuntimeError(f"the engine returned no result for {len(self.remaining[chunk.id])} "
                                   f"items of chunk {chunk.id}")
            self.writer.submit(chunk.id, [], True, group=chunk.job_id)
            self.completed.add(chunk.id)


class Started:
    """A plan whose engine work is over and whose writes may still be committing (`start`). `wait` returns the
    run's stats once every write has committed, and raises the first write's error; `abandon` drops the writes not
    yet started (the one under way commits or rolls back whole)."""

    def __init__(self, execution: _Execution):
        self._execution = execution

    def wait(self) -> ExecutionStats:
        self._execution.writer.close()
        self._execution.account()
        return self._execution.stats

    def abandon(self) -> None:
        self._execution.writer.abandon()


def start(plan: BatchPlan, runner: Runner, sink: Sink, *, write_depth: int = WRITE_DEPTH) -> Started:
    """Run one plan as one engine run: validate per job, stream, and hand each finished engine batch's rows, per
    chunk, to a writer thread (`workers.writer.WriteBehind`) that stores them while the next batch computes. Returns
    when the engine is done, with the last writes possibly still committing: the caller may claim and start its next
    run meanwhile, and learns the outcome from `Started.wait`. An error of the engine work is raised here (the
    writes not started are dropped)."""
    writer = WriteBehind(sink, write_depth, rows_from=get_kind(plan.kind).row_from)
    execution = _Execution(plan, runner, sink, writer)
    try:
        execution.validate_per_job()
        execution.run(plan.items)
        execution.finish()
    except BaseException:
        writer.abandon()
        raise
    return Started(execution)


def execute(plan: BatchPlan, runner: Runner, sink: Sink, *, write_depth: int = WRITE_DEPTH) -> ExecutionStats:
    """`start` and wait: returns once every write has committed; a write's error is raised here."""
    return start(plan, runner, sink, write_depth=write_depth).wait()
