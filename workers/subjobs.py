"""Sub-jobs: work an edit asks of another served model, as an ordinary job on that model's queue.

A reinforce edit whose judge is another served model (`judge.model`) cannot judge in-process: that model lives in
other workers. Each time it judges (once per epoch, and once more for its evaluation) it submits a `generate` job
on that model (the judge's question about each interpretation, one chat turn per text) through the normal submit
path (`submission.submit_job`: stored, then sent on the model's queue; owned by the edit's key) and waits for it,
polling the database. While it waits it serves other queued work of its own model (`serve_others`) and looks at the
edit's job: once that is closed (cancelled, failed elsewhere) the sub-job is cancelled and `EditStopped` raised.
A sub-job that fails or is cancelled by someone else fails the edit's attempt with its reason.
"""

from __future__ import annotations

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


def generate_on(runtime: Any, sender: Any, *, model: str, prompts: Sequence[str], max_new_tokens: int,
                parent_job: str, owner_key_id: int | None, priority: int,
                serve_others: Callable[[], None]) -> list[str]:
    """The chat-format greedy generations of `prompts` by `model`'s workers, in order (a `generate` sub-job)."""
    from selfie_jobs.kinds.generate import GenerateJobCreate
    from selfie_jobs.submission import submit_job

    settings = runtime.settings
    request = GenerateJobCreate(model=model, prompts=list(prompts), chat=True, max_new_tokens=max_new_tokens,
                                priority=priority)

    def submit() -> str:
        with runtime.sessions() as session:
            return submit_job(session, request, settings, sender, owner_key_id=owner_key_id).job.id

    job_id = submit()
    while True:
        state, error, texts = unit_of_work(runtime.sessions, lambda s: _read(s, job_id), settings.db_retry_seconds)
        if state == JobState.SUCCEEDED:
            return texts
        if state in FINAL_JOB_STATES:
            raise RuntimeError(f"the judge's generate job {job_id} on {model!r} is {state}: {error}")
        if _closed(runtime, parent_job):
            unit_of_work(runtime.sessions, lambda s: _cancel(s, job_id, owner_key_id), settings.db_retry_seconds)
            raise EditStopped(parent_job)
        serve_others()
        time.sleep(POLL_SECONDS)


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
