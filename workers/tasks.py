"""Celery tasks: thin wrappers; the logic is in `run_chunk` / `reconcile_once` (callable without Celery).

`selfie.run_chunk(chunk_id)`: claim the chunk (compare-and-set) plus other queued chunks of the same model and
engine settings (`workers.claims`), run them as one engine run, write each chunk's rows as engine batches finish;
while that batch key heads the model's queue, run its next runs back to back, each claimed while the one before
computes, and let each run's last writes commit in the background (`workers.overlap`). A message for a
chunk that is done, cancelled, or held by a live worker is acknowledged without doing anything; one for a chunk of
another model (a message sent before a model's queue was renamed, or put on the wrong queue by hand) is sent on to
that model's workers, claiming nothing.
`selfie.reconcile()`: re-send what the queue lost, fail jobs past their deadline.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as KombuOperationalError

from selfie_jobs import baselines
from selfie_jobs import chunks as chunk_ops
from selfie_jobs.cards import mark_dead_local_workers
from selfie_jobs.queue import (EDIT_KINDS, RECONCILE_TASK, RUN_CHUNK_TASK, RUN_EDIT_TASK, TaskSender, message_counter,
                               send_chunk)
from selfie_jobs.reconcile import reconcile
from selfie_jobs.retry import unit_of_work
from selfie_jobs.settings import Settings
from selfie_jobs.states import JobState
from workers import batcher, claims
from workers.edit_context import edit_context, remove_unstored_files
from workers.sink import DbSink

log = logging.getLogger(__name__)

#: Exit status of a worker process whose accelerator failed (Celery's parent starts a fresh child).
DEVICE_FAILURE_EXIT = 70

#: How long one task may run engine runs of its batch key back to back (`run_chunk`, `_continue_seconds`).
CONTINUE_SECONDS = 30.0


class _BaselineFirst:
    """A runner whose results reach the sink only once the plan's baseline is stored on its jobs: the engine
    computes the baseline as one more row of its first batch (and keeps it), so it is stored between that batch and
    its rows, and a job is never finished without it."""

    def __init__(self, inner, store):
        self.inner = inner
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, items, spec):
        stored = False
        for results in self.inner.stream(items, spec):
            if not stored:
                self.store()
                stored = True
            yield results


def _store_baseline(runtime, runner, plan: batcher.BatchPlan) -> None:
    """The plan's baseline (one per job spec), stored on its jobs that have none yet; a lookup in the engine once
    a batch of the spec ran (asked before, it would be a generation of its own: 6-7% of a small CPU run)."""
    compute = getattr(runner, "baseline", None)
    if compute is None:
        return
    try:
        baseline = compute(plan.spec)
    except Exception as exc:
        if runner.is_input_error(exc):
            return  # the batcher fails these jobs with the engine's own message when it validates them
        raise
    job_ids = sorted({c.job_id for c in plan.chunks})
    unit_of_work(runtime.sessions, lambda session: baselines.store_baseline(session, job_ids, baseline),
                 runtime.settings.db_retry_seconds)


def _start(runtime, plan: batcher.BatchPlan, runner, sink, variants: dict[str, Any]) -> Any:
    """Run one plan's engine work on the weights its spec names (`batcher.start`: its last writes may still be
    committing): the model's own, or a variant swapped in for the whole plan (its baseline included) and put back in
    `finally`, before the writes end (they do not read the weights). A variant that cannot be served fails the
    plan's jobs with the reason; the model's own weights are never served in its place."""
    if plan.spec.get("variant") is None:
        return batcher.start(plan, runner, sink)
    from selfie_core.weights import swapped_in
    from selfie_jobs.variants import VariantUnavailable
    from workers.variants import plan_edit

    try:
        edit = plan_edit(runtime.variants, runtime.model, plan.spec, variants)
    except VariantUnavailable as exc:
        stats = batcher.ExecutionStats(items=len(plan.items))
        for job_id in sorted({c.job_id for c in plan.chunks}):
            error = f"variant {plan.spec['variant']} cannot be served: {exc}"
            log.warning("job %s fails: %s", job_id, error)
            sink.fail_job(job_id, error)
            stats.failed_jobs[job_id] = error
        return _Done(stats)
    with swapped_in(runtime.engine.model, edit):
        return batcher.start(plan, runner, sink)


@dataclass
class _Done:
    """A plan whose writes are all committed (`batcher.Started`'s shape)."""

    stats: batcher.ExecutionStats

    def wait(self) -> batcher.ExecutionStats:
        return self.stats

    def abandon(self) -> None:
        pass


class _EngineRun:
    """One message's engine run after its engine work: the plans' writes (`batcher.Started`) to wait for, then the
    run recorded as finished and its chunks let go. `complete` does it in the task; `complete_later` in the
    completion thread (`workers.overlap`), after the task has returned, so that the worker claims and computes its next run while
    this one's last rows commit."""

    def __init__(self, runtime, claimed: list[chunk_ops.ClaimedChunk], run_id: str, sender: TaskSender | None):
        self.runtime = runtime
        self.claimed = claimed
        self.run_id = run_id
        self.sender = sender
        self.began = time.monotonic()
        self.plans: list[Any] = []

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.claimed]

    def complete(self) -> dict[str, Any]:
        """Wait for every write, record the run; returns the task's summary. Raises a write's error."""
        runtime, settings = self.runtime, self.runtime.settings
        total = batcher.ExecutionStats()
        for plan in self.plans:
            stats = plan.wait()
            total.items += stats.items
            total.inserted += stats.inserted
            total.engine_batches += stats.engine_batches
            total.splits += stats.splits
            total.chunks_done += stats.chunks_done
            total.failed_jobs.update(stats.failed_jobs)
        elapsed = time.monotonic() - self.began
        unit_of_work(runtime.sessions, lambda session: chunk_ops.finish_engine_run(session, self.run_id, elapsed),
                     settings.db_retry_seconds)
        runtime.finished(total.chunks_done)
        runtime.served(total.inserted)
        log.info("engine run %s: %d chunks of %d jobs, %d items, %d rows new, %.2fs", self.run_id, len(self.claimed),
                 len({c.job_id for c in self.claimed}), total.items, total.inserted, elapsed)
        return {"chunk_id": self.claimed[0].id, "engine_run": self.run_id, "chunks": self.ids,
                "done": total.chunks_done, "inserted": total.inserted, "failed_jobs": total.failed_jobs,
                "elapsed_s": round(elapsed, 3)}

    def settle(self) -> None:
        """On the way out after an error: let the writes already handed over commit (they are good work; the
        chunks they complete are done and not handed back), logging their own errors."""
        for plan in self.plans:
            try:
                plan.wait()
            except Exception:  # noqa: BLE001 - the first error is the one raised; this one is logged
                log.exception("engine run %s: a write failed while the run was being given up", self.run_id)

    def complete_later(self) -> None:
        """`complete` in a thread of its own: the task returned (its message is acknowledged), so a write's error is
        handled here as the task would: the chunks not done go back to the queue. A worker killed meanwhile leaves
        them `running` under an owner that no longer beats: the reconciler sends them again and their committed
        rows are skipped by the unique key."""
        try:
            self.complete()
        except Exception as exc:
            log.exception("engine run %s: storing its last results failed; handing its chunks back", self.run_id)
            try:
                claims.hand_back(self.runtime, self.claimed, f"{type(exc).__name__}: {exc}", self.sender)
            except Exception:  # noqa: BLE001 - then the reconciler sends them again when their lease runs out
                log.exception("engine run %s: could not hand its chunks back", self.run_id)
        finally:
            self.runtime.unhold(self.ids)


def run_chunk(runtime, chunk_id: int, sender: TaskSender | None = None, *, wait: bool = True) -> dict[str, Any]:
    """Claim `chunk_id` (and companions), run them as one engine run, store the results. Returns a summary.

    `wait=False` (the Celery task) keeps the accelerator busy between runs:
    - the task returns once the engine work is done, and the run's last writes commit in the completion thread
      (`runtime.overlap`), which then records the run (`_EngineRun.complete_later`); the summary says `"completing": True`;
    - while its batch key heads the model's queue, the next run of it is claimed while the engine computes this
      one, and runs right after it in the same task (`claims.ClaimAhead`), for up to `_continue_seconds`; the
      summary's `"continued"` lists those runs.
    Edit runs always wait (their evaluation reads what they stored) and never continue."""
    if runtime.has_finished(chunk_id):
        # it ran as a companion of an earlier chunk's message and its completion committed: done is final
        log.info("chunk %s: nothing to do (this worker finished it)", chunk_id)
        return {"chunk_id": chunk_id, "skipped": "chunk is done"}
    if chunk_id in runtime.held():
        # it runs, or its run completes in the background, in this process (a companion of an earlier message):
        # the claim would find it running under this owner and say the same, one transaction later
        log.info("chunk %s: nothing to do (chunk is already being run by this worker)", chunk_id)
        return {"chunk_id": chunk_id, "skipped": "chunk is already being run by this worker"}
    claim = claims.claim(runtime, chunk_id)
    if not claim.chunks:
        log.info("chunk %s: nothing to do (%s)", chunk_id, claim.why)
        if claim.resend is not None and sender is not None:
            try:
                send_chunk(sender, claim.resend.chunk_id, claim.resend.model, claim.resend.priority,
                           claim.resend.kind)
            except Exception:  # noqa: BLE001 - the chunk is still queued: the reconciler re-sends it
                log.exception("could not send chunk %s on to model %s", chunk_id, claim.resend.model)
        return {"chunk_id": chunk_id, "skipped": claim.why}
    if wait or claim.chunks[0].kind in EDIT_KINDS:
        return _run(runtime, chunk_id, claim, sender, wait=wait)
    first: dict[str, Any] | None = None
    continued: list[str] = []
    until = time.monotonic() + _continue_seconds(runtime.settings)
    ahead: claims.ClaimAhead | None = None
    try:
        while True:
            more = time.monotonic() < until and not runtime.shutting_down()
            ahead = claims.ClaimAhead(runtime, claim.chunks[0].batch_key) if more else None
            summary = _run(runtime, chunk_id, claim, sender, wait=False)
            if first is None:
                first = summary
            else:
                continued.append(summary.get("engine_run"))
            if ahead is None or summary.get("timed_out") or runtime.shutting_down():
                break
            claim = ahead.result()
            # nothing claimed, or a more urgent job arrived while the run before computed: the task ends
            if not claim.chunks or claims.outranked(runtime, claim):
                break
            ahead = None
    finally:
        if ahead is not None:  # not started (the run before failed or timed out, the worker is stopping, or a
            # more urgent job is queued): what was claimed for it goes back, its attempt with it
            ahead.give_back("claimed ahead of a run, not started", sender)
    return {**first, "continued": continued} if continued else first


def _continue_seconds(settings: Settings) -> float:
    """How long one task runs runs of its batch key back to back: long enough that claims and answers to messages
    are rare against the engine work, short enough that other batch keys of the same priority wait little and the
    task stays far from its soft time limit."""
    return min(CONTINUE_SECONDS, settings.chunk_soft_time_limit_seconds / 4)


def _run(runtime, chunk_id: int, claim: claims.Claim, sender: TaskSender | None, *, wait: bool) -> dict[str, Any]:
    """One engine run of what `claim` holds (see `run_chunk`)."""
    claimed = claim.chunks
    ids = [c.id for c in claimed]
    runtime.hold(ids, {c.id: c.job_id for c in claimed})
    settings = runtime.settings
    run = _EngineRun(runtime, claimed, claim.run_id, sender)
    handed_on = False
    try:
        inputs = claim.inputs or {}
        queued_jobs = [c.job_id for c in claimed if c.job_state == JobState.QUEUED]
        if queued_jobs:  # a job's first chunk: the job is running now (a transaction of its own, see the function)
            unit_of_work(runtime.sessions, lambda session: chunk_ops.mark_jobs_running(session, queued_jobs),
                         settings.db_retry_seconds)
        sink = DbSink(runtime.sessions, runtime.name, runtime.model, claim.run_id, settings.db_retry_seconds)
        if runtime.options.inject_fault:
            from workers.faults import FaultInjectingSink

            sink = FaultInjectingSink(sink, runtime.options.inject_fault)
        edits = False
        for plan in batcher.plan_batches(claimed, inputs):
            runner = runtime.runner_for(plan.kind)
            if plan.kind in EDIT_KINDS:
                edits = True
                runner = runner.bound(edit_context(runtime, sender, run_chunk))
            started = _start(runtime, plan, _BaselineFirst(runner, lambda: _store_baseline(runtime, runner, plan)),
                             sink, claim.variants or {})
            run.plans.append(started)
            if plan.kind in EDIT_KINDS:
                stats = started.wait()
                if stats.closed_jobs:
                    remove_unstored_files(runtime, sorted(stats.closed_jobs))
        if not wait and not edits:
            runtime.overlap.defer(run.complete_later)
            handed_on = True
            return {"chunk_id": chunk_id, "engine_run": claim.run_id, "chunks": ids, "completing": True}
        return run.complete()
    except SoftTimeLimitExceeded:
        log.error("chunk %s: soft time limit (%ss) exceeded; handing chunks back", chunk_id,
                  settings.chunk_soft_time_limit_seconds)
        run.settle()
        claims.hand_back(runtime, claimed, f"soft time limit of {settings.chunk_soft_time_limit_seconds}s exceeded", sender)
        return {"chunk_id": chunk_id, "timed_out": True}
    except batcher.DeviceFailure as exc:
        # The CUDA context is unusable after a device-side error: hand the chunks back, say so, and exit; the
        # acks_late message is redelivered and Celery's parent starts a fresh process with a fresh context.
        log.critical("device failure in chunk %s, restarting the worker process: %s", chunk_id, exc)
        try:
            run.settle()
            claims.hand_back(runtime, claimed, f"device failure: {exc}", sender)
            runtime.stop(state="dead")
        finally:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(DEVICE_FAILURE_EXIT)
    except Exception as exc:
        # Anything else is a bug or an outage beyond the retry window: put the chunks back and let the error
        # surface in the logs; after max_chunk_attempts the job fails with this error stored.
        log.exception("chunk %s failed", chunk_id)
        run.settle()
        claims.hand_back(runtime, claimed, f"{type(exc).__name__}: {exc}", sender)
        raise
    finally:
        if not handed_on:
            runtime.unhold(ids)


def reconcile_once(settings: Settings, sessions, app: Celery) -> dict[str, Any]:
    """Re-send lost chunks and fail overdue jobs; returns what it did. `app` sends, and its broker connection
    counts the messages waiting in each queue (a queued chunk is lost only where its queue is short of them)."""

    with ExitStack() as stack:
        try:
            waiting = stack.enter_context(message_counter(app))
        except KombuOperationalError as exc:
            # The rest of the pass needs no broker (overdue jobs, dead workers, chunks of closed jobs); without
            # counts every queued chunk past the grace period counts as lost, as the reconcile rule says.
            log.warning("reconcile: the broker cannot count its messages (%s); going on without its counts", exc)
            waiting = None

        def unit(session):
            return mark_dead_local_workers(session), reconcile(session, settings, waiting=waiting)

        dead, report = unit_of_work(sessions, unit, settings.db_retry_seconds)
    sent = 0
    for item in report.redeliver:
        send_chunk(app, item.chunk_id, item.model, item.priority, item.kind)
        sent += 1
    if sent or report.timed_out_jobs or report.failed_jobs or report.closed_chunks:
        log.warning("reconcile: re-sent %d chunks, timed out %d jobs, failed %d jobs, closed %d chunks of closed "
                    "jobs, dead workers %s", sent, len(report.timed_out_jobs), len(report.failed_jobs),
                    report.closed_chunks, dead)
    return {"resent": [r.chunk_id for r in report.redeliver], "timed_out_jobs": report.timed_out_jobs,
            "failed_jobs": report.failed_jobs, "closed_chunks": report.closed_chunks, "dead_workers": dead}


def skip(task, reason: str) -> None:
    """End a task that did no work (its chunk was done by a shared batch, cancelled, or is held by another worker)
    as IGNORED, not as a success: Flower would count it as work done. The custom `task-ignored` event carries the
    reason and moves the task out of STARTED in Flower's list (Celery itself sends no event for an ignored task)."""
    try:
        task.send_event("task-ignored", reason=reason)
    except Exception:  # noqa: BLE001 - a monitoring event; the chunk needs nothing more
        log.warning("could not send the task-ignored event of task %s", task.request.id, exc_info=True)
    raise Ignore()


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register the task functions on `app` (tasks are bound to the app, never to a module-level one)."""

    @app.task(name=RUN_CHUNK_TASK, ignore_result=True, bind=True)
    def run_chunk_task(task, chunk_id: int) -> dict[str, Any]:
        from workers.runtime import get_runtime

        # wait=False: the run's last rows commit while this process takes its next message (`_EngineRun`)
        summary = run_chunk(get_runtime(), int(chunk_id), sender=app, wait=False)
        if "skipped" in summary:
            skip(task, summary["skipped"])
        return summary

    @app.task(name=RUN_EDIT_TASK, ignore_result=True, bind=True)
    def run_edit_task(task, chunk_id: int) -> dict[str, Any]:
        # The same claim and run as run_chunk; a name of its own for monitoring and its own time limit.
        from workers.runtime import get_runtime

        summary = run_chunk(get_runtime(), int(chunk_id), sender=app)
        if "skipped" in summary:
            skip(task, summary["skipped"])
        return summary

    @app.task(name=RECONCILE_TASK, ignore_result=True)
    def reconcile_task() -> dict[str, Any]:
        from selfie_jobs.db import get_sessionmaker

        return reconcile_once(settings, get_sessionmaker(settings.resolved_database_url()), app)

    from workers.audits import register_audit_tasks
    from workers.retention import register_retention_tasks

    register_audit_tasks(app, settings)
    register_retention_tasks(app, settings)
