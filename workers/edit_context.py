"""What the task layer lends an edit's runner (`workers.runners.edits.EditContext`): the epochs' rows, the cancel
check, other work of the model between epochs, and sub-jobs on other models; the removal of the files of edits
that ended without a variant.

Invariants: an epoch's row is upserted (an edit restarted from scratch writes its epochs again) and the job's state
is read in the same transaction, so a cancel stops the edit at the end of the epoch it lands in; between epochs at
most one engine run of other kinds' queued chunks of this model runs here (their own messages later find them done
and are acknowledged); the edit's own time limit is never absorbed by such a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from selfie_jobs import chunks as chunk_ops
from selfie_jobs.models import EditEpoch, Job
from selfie_jobs.queue import EDIT_KINDS, TaskSender
from selfie_jobs.retry import unit_of_work
from selfie_jobs.states import FINAL_JOB_STATES

log = logging.getLogger(__name__)


def edit_context(runtime: Any, sender: TaskSender | None, run_chunk: Callable[..., dict[str, Any]]) -> Any:
    """The context of one edit's run; `run_chunk` is `workers.tasks.run_chunk` (how other work is run)."""
    from selfie_jobs.variants import store_root
    from workers.runners.edits import EditContext

    settings = runtime.settings

    def store_epoch(job_id: str, row: dict[str, Any]) -> bool:
        """Upsert the epoch's row; returns whether the job is still open."""
        def unit(session) -> bool:
            session.merge(EditEpoch(job_id=job_id, **row))
            return session.scalar(select(Job.state).where(Job.id == job_id)) not in FINAL_JOB_STATES

        return unit_of_work(runtime.sessions, unit, settings.db_retry_seconds)

    def serve_others() -> None:
        """At most one engine run of other kinds' queued chunks of this model (and their companions)."""
        chunk_id = unit_of_work(runtime.sessions,
                                lambda session: chunk_ops.next_queued(session, runtime.model, exclude_kinds=EDIT_KINDS),
                                settings.db_retry_seconds)
        if chunk_id is None:
            return
        try:
            summary = run_chunk(runtime, chunk_id, sender)
        except SoftTimeLimitExceeded:
            raise  # the edit's own time limit: its task hands the edit back
        except Exception:  # noqa: BLE001 - that run handed its chunks back and logged why; the edit goes on
            log.warning("chunk %s, run between an edit's epochs, failed; the edit goes on", chunk_id)
            return
        if summary.get("timed_out"):  # the limit fired inside that run, which handed its chunks back
            raise SoftTimeLimitExceeded()

    def generate(model: str, prompts, max_new_tokens: int, item) -> list[str]:
        from workers.subjobs import generate_on

        payload = item.payload or {}
        return generate_on(runtime, sender, model=model, prompts=prompts, max_new_tokens=max_new_tokens,
                           parent_job=item.job_id, owner_key_id=payload.get("owner_key_id"),
                           priority=payload.get("priority", 5), serve_others=serve_others)

    def cancel_stale_subjobs(item) -> None:
        from workers.subjobs import cancel_stale

        cancelled = cancel_stale(runtime, item.job_id, (item.payload or {}).get("owner_key_id"))
        if cancelled:
            log.warning("edit %s: cancelled sub-jobs an earlier attempt left: %s", item.job_id, ", ".join(cancelled))

    return EditContext(store_epoch=store_epoch, job_closed=runtime.watch.is_closed, serve_others=serve_others,
                       store_root=store_root(settings), generate=generate if sender is not None else None,
                       cancel_stale_subjobs=cancel_stale_subjobs)


def remove_unstored_files(runtime: Any, job_ids) -> None:
    """Remove the variant files of edit jobs that ended here without a variant (cancelled while the file was
    written, or failed): a file is kept only while a `variants` row names it."""
    from selfie_jobs.models import Variant
    from selfie_jobs.variants import remove_files, store_root

    for job_id in job_ids:
        stored = unit_of_work(runtime.sessions,
                              lambda s: s.scalar(select(Variant.id).where(Variant.job_id == job_id)) is not None,
                              runtime.settings.db_retry_seconds)
        if not stored:
            remove_files(store_root(runtime.settings), job_id)
