"""Sub-jobs: work an edit asks of another served model, as an ordinary job on that model's queue.

A reinforce edit whose judge is another served model (`judge.model`) cannot judge in-process: that model lives in
other workers. Each time it judges (once per epoch, and once more for its evaluation) it submits a `generate` job
on that model (the judge's question about each interpretation, one chat turn per text) through the normal submit
path (`submission.submit_job`: stored, then sent on the model's queue; owned by the edit's key) and waits for it,
polling the database. While it waits it serves other queued work of its own model (`serve_others`) and looks at the
edit's job: once that is closed (cancelled, failed elsewhere) the sub-job is cancelled and `EditStopped` raised.

Invariants:
- the wait is bounded: a sub-job not started within `Settings.subjob_start_seconds` (its model has no live worker,
  or its workers are busy) or not finished within `Settings.subjob_finish_seconds` of its submission ends the wait;
- whatever ends the wait other than the sub-job's success (a deadline, the edit's time limit, any error) cancels
  the sub-job first;
- a sub-job that cannot serve the edit (refused at submission, e.g. over quota or too many prompts; failed, e.g. a
  judge prompt past its model's context; cancelled by someone else; past a deadline) raises `SubJobFailed`, which the
  edit's runner counts as an input error: the edit fails once with the reason (another attempt would train again
  only to meet the same end; the sub-job had its own retries);
- every sub-job's idempotency key starts with `subjob_prefix(edit job id)`, so an edit restarted after its worker
  died finds and cancels the sub-jobs its earlier attempt left open (`cancel_stale`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select

from selfie_jobs.retry import unit_of_work
from selfie_jobs.states import FINAL_JOB_STATES, JobState

#: Seconds between two looks at a sub-job while it runs (other work of this model is served in between).
POLL_SECONDS = 0.2


class EditStopped(Exception):
    """The edit's job was closed (cancelled) while it waited for a sub-job: the edit ends, storing nothing."""


class SubJobFailed(Exception):
    """A sub-job cannot give the edit what it needs (refused, failed, cancelled by someone else, not served in time):
    the edit fails once with this reason."""


def subjob_prefix(parent_job: str) -> str:
    """The start of the idempotency key of every sub-job of edit `parent_job`."""
    return f"edit-subjob:{parent_job}:"


def generate_on(runtime: Any, sender: Any, *, model: str, prompts: Sequence[str], max_new_tokens: int,
                parent_job: str, owner_key_id: int | None, priority: int,
                serve_others: Callable[[], None]) -> list[str]:
    """The chat-format greedy generations of `prompts` by `model`'s workers, in order (a `generate` sub-job)."""
    from selfie_jobs.errors import DomainError
    from selfie_jobs.kinds.generate import GenerateJobCreate
    from selfie_jobs.submission import submit_job

    settings = runtime.settings
    what = f"the judge model {model!r}"
    try:
        request = GenerateJobCreate(model=model, prompts=list(prompts), chat=True, max_new_tokens=max_new_tokens,
                                    priority=priority,
                                    idempotency_key=subjob_prefix(parent_job) + secrets.token_hex(8))
        with runtime.sessions() as session:
            job_id = submit_job(session, request, settings, sender, owner_key_id=owner_key_id).job.id
    except (DomainError, ValueError) as exc:  # refused as any caller's job would be (quota, size, context)
        raise SubJobFailed(f"{what} refused the judge's generate job: {exc}") from exc
    submitted = time.monotonic()
    try:
        while True:
            state, error, texts = unit_of_work(runtime.sessions, lambda s: _read(s, job_id),
                                               settings.db_retry_seconds)
            if state == JobState.SUCCEEDED:
                return texts
            if state in FINAL_JOB_STATES:
                raise SubJobFailed(f"the judge's generate job {job_id} on {model!r} is {state}: {error}")
            waited = time.monotonic() - submitted
            if state == JobState.QUEUED and waited > settings.subjob_start_seconds:
                raise SubJobFailed(_not_started(runtime, model, job_id, settings.subjob_start_seconds))
            if waited > settings.subjob_finish_seconds:
                raise SubJobFailed(f"the judge's generate job {job_id} on {model!r} did not finish within "
                                   f"{settings.subjob_finish_seconds:g}s (SELFIE_SUBJOB_FINISH_SECONDS)")
            if _closed(runtime, parent_job):
                raise EditStopped(parent_job)
            serve_others()
            time.sleep(POLL_SECONDS)
    except BaseException:
        # the edit no longer waits for it (stopped, failed, its time limit): nobody will read its answers
        unit_of_work(runtime.sessions, lambda s: _cancel(s, job_id, owner_key_id), settings.db_retry_seconds)
        raise


def cancel_stale(runtime: Any, parent_job: str, owner_key_id: int | None) -> list[str]:
    """Cancel the open sub-jobs of edit `parent_job` (an earlier attempt's, left when its worker died); their ids."""
    from selfie_jobs.models import Job
    from selfie_jobs.submission import idempotency_scope

    scope = idempotency_scope(owner_key_id, subjob_prefix(parent_job))

    def unit(session) -> list[str]:
        ids = list(session.scalars(select(Job.id).where(Job.idempotency_scope.startswith(scope, autoescape=True),
                                                        Job.state.in_([JobState.QUEUED, JobState.RUNNING]))))
        for job_id in ids:
            _cancel(session, job_id, owner_key_id)
        return ids

    return unit_of_work(runtime.sessions, unit, runtime.settings.db_retry_seconds)


def _not_started(runtime: Any, model: str, job_id: str, seconds: float) -> str:
    from selfie_jobs.liveness import live_workers

    alive = unit_of_work(runtime.sessions, lambda s: bool(live_workers(s, runtime.settings.worker_alive_seconds,
                                                                        model=model)),
                         runtime.settings.db_retry_seconds)
    why = "its workers did not start it" if alive else f"the judge model {model!r} has no live worker"
    return (f"{why}: the judge's generate job {job_id} waited {seconds:g}s without starting "
            "(SELFIE_SUBJOB_START_SECONDS)")


def _read(session: Any, job_id: str) -> tuple[str, str | None, list[str]]:
    from selfie_jobs.models import Generation, Job

    job = session.get(Job, job_id)
    texts: list[str] = []
    if job.state == JobState.SUCCEEDED:
        texts = list(session.scalars(select(Generation.text).where(Generation.job_id == job_id)
                                     .order_by(Generation.prompt_index)))
    return str(job.state), job.error, texts


def _closed(runtime: Any, job_id: str) -> bool:
    from selfie_jobs.models import Job

    state = unit_of_work(runtime.sessions, lambda s: s.scalar(select(Job.state).where(Job.id == job_id)),
                         runtime.settings.db_retry_seconds)
    return state in FINAL_JOB_STATES


def _cancel(session: Any, job_id: str, owner_key_id: int | None) -> None:
    from selfie_jobs.auth import Principal
    from selfie_jobs.queries import cancel_job

    cancel_job(session, job_id, Principal(key_id=owner_key_id, is_admin=True, name="edit"))
