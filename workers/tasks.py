"""Celery tasks: thin wrappers; the logic is in `run_chunk` / `reconcile_once` (callable without Celery).

`selfie.run_chunk(chunk_id)`: claim the chunk (compare-and-set) plus other queued chunks of the same model and
engine settings, run them as one engine run, write each chunk's rows as engine batches finish. A message for a
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
from selfie_jobs.liveness import live_workers, owner_is_alive
from selfie_jobs.kinds import get_kind
from selfie_jobs.reconcile import Redelivery, reconcile
from selfie_jobs.models import Chunk, Job
from selfie_jobs.queue import (EDIT_KINDS, RECONCILE_TASK, RUN_CHUNK_TASK, RUN_EDIT_TASK, TaskSender, message_counter,
                               send_chunk)
from selfie_jobs.retry import unit_of_work
from selfie_jobs.settings import Settings
from selfie_jobs.states import JobState
from selfie_jobs.variants import variant_refs
from workers import batcher
from workers.edit_context import edit_context, remove_unstored_files
from workers.sink import DbSink

log = logging.getLogger(__name__)

#: Exit status of a worker process whose accelerator failed (Celery's parent starts a fresh child).
DEVICE_FAILURE_EXIT = 70


@dataclass(frozen=True)
class _Claim:
    chunks: list[chunk_ops.ClaimedChunk]
    why: str | None = None  # why nothing was claimed
    resend: Redelivery | None = None  # a message for another model's chunk: sent on to that model's workers
    inputs: dict[Any, Any] | None = None  # what the chunks' kinds loaded for them (prompts, vectors)
    run_id: str | None = None  # the engine run recorded for them
    variants: dict[str, Any] | None = None  # the rows of the variants their specs name (VariantRef), by id


def _claim(runtime, chunk_id: int) -> _Claim:
    settings = runtime.settings
    owner = runtime.name

    def unit(session) -> _Claim:
        # The model is part of the compare-and-set: a chunk this worker cannot run is never claimed, so a
        # message that reached the wrong model's worker uses up none of the chunk's attempts.
        first = chunk_ops.claim_chunk(session, chunk_id, owner, settings.lease_seconds, model=runtime.model)
        if first is None:
            row = session.get(Chunk, chunk_id)
            if row is None:
                return _Claim([], "no such chunk")
            if row.model != runtime.model:
                return _misrouted(session, runtime, row)
            if row.state != "running":
                return _Claim([], f"chunk is {row.state}")
            if row.owner == owner:
                if row.id in runtime.held():
                    return _Claim([], "chunk is already being run by this worker")
                # This process claimed it in an earlier task that ended without handing it back (a failed
                # hand-back): nobody runs it, so the redelivered message takes it over now, not at lease end.
            elif owner_is_alive(session, row.owner, settings.worker_alive_seconds,
                                hostname=runtime.identity.hostname):
                return _Claim([], f"chunk is held by live worker {row.owner}")
            first = chunk_ops.claim_chunk(session, chunk_id, owner, settings.lease_seconds, dead_owner=row.owner,
                                          model=runtime.model)
            if first is None:
                return _Claim([], "another worker took the chunk first")
            log.warning("took over chunk %s from %s", chunk_id,
                        "an earlier task of this worker" if row.owner == owner else f"dead worker {row.owner}")
        if first.attempts > settings.max_chunk_attempts:
            chunk_ops.fail_chunk(session, first.id, f"chunk {first.index} was started {first.attempts - 1} "
                                                    "times without finishing (worker crashes or time limits)")
            return _Claim([], "chunk failed after too many attempts")
        budget = settings.max_batch_interpretations - first.size
        more = chunk_ops.claim_more(session, owner, first.model, first.batch_key, budget, settings.lease_seconds,
                                    exclude=[first.id])
        claimed = [first, *more]
        # Reads and an insert that take no job lock: in the claim's transaction, one commit fewer per engine run.
        inputs: dict[Any, Any] = {}
        for kind in dict.fromkeys(c.kind for c in claimed):  # what each kind's items need (prompts, vectors)
            inputs.update(get_kind(kind).load_inputs(session, [c for c in claimed if c.kind == kind]))
        # the variants the plans name, read with the chunks: a variant deleted after this fails its jobs in the run
        refs = variant_refs(session, [c.spec["variant"] for c in claimed if c.spec.get("variant") is not None])
        run_id = chunk_ops.record_engine_run(session, owner, runtime.model, claimed)
        return _Claim(claimed, inputs=inputs, run_id=run_id, variants=refs)

    return unit_of_work(runtime.sessions, unit, settings.db_retry_seconds)


def _misrouted(session, runtime, row: Chunk) -> _Claim:
    """A message for a chunk of another model: one sent while ``org/m`` and ``org_m`` still shared a queue (before
    `model_queue` told such names apart), or put on the wrong queue by hand, and this worker took it."""
    why = f"chunk is for model {row.model}, this worker serves {runtime.model}"
    if row.state != "queued":
        return _Claim([], why)  # running or finished: its own model's workers and the reconciler have it
    if not live_workers(session, runtime.settings.worker_alive_seconds, model=row.model):
        # Nobody serves that model now: sending it on would only bring it back to this queue's workers at once.
        # It waits, queued, like any job of an unserved model; the reconciler re-sends it later.
        return _Claim([], why + " (no live worker serves it; left to the reconciler)")
    return _Claim([], why + " (sent on)", Redelivery(row.id, row.model, row.priority,
                                                          session.get(Job, row.job_id).kind))


def _hand_back(runtime, claimed: list[chunk_ops.ClaimedChunk], reason: str, sender: TaskSender | None) -> None:
    settings = runtime.settings
    priority = {c.id: c.priority for c in claimed}
    kind = {c.id: c.kind for c in claimed}

    def unit(session):
        return chunk_ops.release_chunks(session, list(priority), runtime.name, reason,
                                        max_attempts=settings.max_chunk_attempts)

    requeued = unit_of_work(runtime.sessions, unit, settings.db_retry_seconds)
    if sender is not None:
        for chunk_id in requeued:
            try:
                send_chunk(sender, chunk_id, runtime.model, priority[chunk_id], kind[chunk_id])
            except Exception:  # noqa: BLE001 - the reconciler re-sends queued chunks anyway
                log.exception("could not re-send chunk %s", chunk_id)


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


def _execute(runtime, plan: batcher.BatchPlan, runner, sink, variants: dict[str, Any]) -> batcher.ExecutionStats:
    """Run one plan on the weights its spec names: the model's own, or a variant swapped in for the whole plan (its
    baseline included) and put back in `finally`. A variant that cannot be served fails the plan's jobs with the
    reason; the model's own weights are never served in its place."""
    if plan.spec.get("variant") is None:
        return batcher.execute(plan, runner, sink)
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
        return stats
    with swapped_in(runtime.engine.model, edit):
        return batcher.execute(plan, runner, sink)


def run_chunk(runtime, chunk_id: int, sender: TaskSender | None = None) -> dict[str, Any]:
    """Claim `chunk_id` (and companions), run them as one engine run, store the results. Returns a summary."""
    if runtime.has_finished(chunk_id):
        # it ran as a companion of an earlier chunk's message and its completion committed: done is final
        log.info("chunk %s: nothing to do (this worker finished it)", chunk_id)
        return {"chunk_id": chunk_id, "skipped": "chunk is done"}
    claim = _claim(runtime, chunk_id)
    claimed = claim.chunks
    if not claimed:
        log.info("chunk %s: nothing to do (%s)", chunk_id, claim.why)
        if claim.resend is not None and sender is not None:
            try:
                send_chunk(sender, claim.resend.chunk_id, claim.resend.model, claim.resend.priority,
                           claim.resend.kind)
            except Exception:  # noqa: BLE001 - the chunk is still queued: the reconciler re-sends it
                log.exception("could not send chunk %s on to model %s", chunk_id, claim.resend.model)
        return {"chunk_id": chunk_id, "skipped": claim.why}
    ids = [c.id for c in claimed]
    runtime.hold(ids, {c.id: c.job_id for c in claimed})
    settings = runtime.settings
    started = time.monotonic()
    try:
        inputs, run_id = claim.inputs or {}, claim.run_id
        queued_jobs = [c.job_id for c in claimed if c.job_state == JobState.QUEUED]
        if queued_jobs:  # a job's first chunk: the job is running now (a transaction of its own, see the function)
            unit_of_work(runtime.sessions, lambda session: chunk_ops.mark_jobs_running(session, queued_jobs),
                         settings.db_retry_seconds)
        sink = DbSink(runtime.sessions, runtime.name, runtime.model, run_id, settings.db_retry_seconds)
        if runtime.options.inject_fault:
            from workers.faults import FaultInjectingSink

            sink = FaultInjectingSink(sink, runtime.options.inject_fault)
        total = batcher.ExecutionStats()
        for plan in batcher.plan_batches(claimed, inputs):
            runner = runtime.runner_for(plan.kind)
            if plan.kind in EDIT_KINDS:
                runner = runner.bound(edit_context(runtime, sender, run_chunk))
            stats = _execute(runtime, plan, _BaselineFirst(runner, lambda: _store_baseline(runtime, runner, plan)),
                             sink, claim.variants or {})
            if plan.kind in EDIT_KINDS and stats.closed_jobs:
                remove_unstored_files(runtime, sorted(stats.closed_jobs))
            total.items += stats.items
            total.inserted += stats.inserted
            total.engine_batches += stats.engine_batches
            total.splits += stats.splits
            total.chunks_done += stats.chunks_done
            total.failed_jobs.update(stats.failed_jobs)
        elapsed = time.monotonic() - started
        unit_of_work(runtime.sessions, lambda session: chunk_ops.finish_engine_run(session, run_id, elapsed),
                     settings.db_retry_seconds)
        runtime.finished(total.chunks_done)
        runtime.served(total.inserted)
        log.info("engine run %s: %d chunks of %d jobs, %d items, %d rows new, %.2fs", run_id, len(claimed),
                 len({c.job_id for c in claimed}), total.items, total.inserted, elapsed)
        return {"chunk_id": chunk_id, "engine_run": run_id, "chunks": ids, "done": total.chunks_done,
                "inserted": total.inserted, "failed_jobs": total.failed_jobs, "elapsed_s": round(elapsed, 3)}
    except SoftTimeLimitExceeded:
        log.error("chunk %s: soft time limit (%ss) exceeded; handing chunks back", chunk_id,
                  settings.chunk_soft_time_limit_seconds)
        _hand_back(runtime, claimed, f"soft time limit of {settings.chunk_soft_time_limit_seconds}s exceeded", sender)
        return {"chunk_id": chunk_id, "timed_out": True}
    except batcher.DeviceFailure as exc:
        # The CUDA context is unusable after a device-side error: hand the chunks back, say so, and exit; the
        # acks_late message is redelivered and Celery's parent starts a fresh process with a fresh context.
        log.critical("device failure in chunk %s, restarting the worker process: %s", chunk_id, exc)
        try:
            _hand_back(runtime, claimed, f"device failure: {exc}", sender)
            runtime.stop(state="dead")
        finally:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(DEVICE_FAILURE_EXIT)
    except Exception as exc:
        # Anything else is a bug or an outage beyond the retry window: put the chunks back and let the error
        # surface in the logs; after max_chunk_attempts the job fails with this error stored.
        log.exception("chunk %s failed", chunk_id)
        _hand_back(runtime, claimed, f"{type(exc).__name__}: {exc}", sender)
        raise
    finally:
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

        summary = run_chunk(get_runtime(), int(chunk_id), sender=app)
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
