"""An edit's sub-jobs (workers.subjobs) against a real SQLite database and a recording queue: the wait for one is
bounded (a judge model without a live worker fails the edit with that reason), whatever ends the wait cancels the
sub-job, refusals and failures that would recur are input errors of the edit (it fails once), and a restarted edit
cancels the sub-jobs its earlier attempt left."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy import select

from selfie_jobs.auth import Principal, create_key
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.kinds.generate import GenerateJobCreate
from selfie_jobs.models import Job
from selfie_jobs.queries import cancel_job
from selfie_jobs.submission import submit_job
from tests.apisupport import prepare_database, settings_for, tiny_card
from workers.subjobs import SubJobFailed, cancel_stale, generate_on, subjob_prefix

JUDGE = "tiny-judge"


class Sender:
    def send_task(self, name, args=None, **options):
        pass


@pytest.fixture
def runtime(sqlite_url):
    prepare_database(sqlite_url, model=JUDGE, card=tiny_card(name=JUDGE, chat_template="{{ messages }}"))
    settings = settings_for(sqlite_url, "redis://unused", subjob_start_seconds=0.5, subjob_finish_seconds=30)
    return SimpleNamespace(settings=settings, sessions=get_sessionmaker(sqlite_url))


def ask(runtime, serve_others=lambda: None, prompts=("is this fine?",), owner_key_id=None, parent="edit-1"):
    return generate_on(runtime, Sender(), model=JUDGE, prompts=list(prompts), max_new_tokens=2, parent_job=parent,
                       owner_key_id=owner_key_id, priority=5, serve_others=serve_others)


def subjobs(runtime) -> list[Job]:
    with runtime.sessions() as s:
        return list(s.scalars(select(Job).where(Job.model == JUDGE)))


def test_a_judge_model_without_a_live_worker_fails_the_edit_once_and_its_sub_job_is_cancelled(runtime):
    with pytest.raises(SubJobFailed, match=f"the judge model '{JUDGE}' has no live worker"):
        ask(runtime)
    (job,) = subjobs(runtime)
    assert job.state == "cancelled" and job.idempotency_scope.startswith("local:" + subjob_prefix("edit-1"))


class TimeLimit(BaseException):
    """Stands in for Celery's SoftTimeLimitExceeded, raised wherever the task happens to be."""


def test_any_exit_while_waiting_cancels_the_sub_job(runtime):
    def serve_others():
        raise TimeLimit()

    with pytest.raises(TimeLimit):
        ask(runtime, serve_others)
    assert [j.state for j in subjobs(runtime)] == ["cancelled"]


def test_a_sub_job_cancelled_by_someone_else_fails_the_edit_with_the_reason(runtime):
    def serve_others():
        with runtime.sessions() as s, s.begin():
            (job,) = s.scalars(select(Job).where(Job.model == JUDGE))
            cancel_job(s, job.id, Principal(key_id=None, is_admin=True, name="user"))

    with pytest.raises(SubJobFailed, match="is cancelled: cancelled by request"):
        ask(runtime, serve_others)


def test_a_refused_sub_job_fails_the_edit_with_the_refusal(runtime):
    with pytest.raises(SubJobFailed, match="refused"):  # max_prompts_per_job is 20 in these settings
        ask(runtime, prompts=[f"is {i} fine?" for i in range(21)])
    with runtime.sessions() as s:
        key, _ = create_key(s, "small", daily_quota=1)
        s.commit()
        key_id = key.id
    with pytest.raises(SubJobFailed, match="quota"):
        ask(runtime, prompts=["is this fine?", "and this?"], owner_key_id=key_id)
    assert subjobs(runtime) == []


def test_a_restarted_edit_cancels_the_sub_jobs_its_earlier_attempt_left(runtime):
    def left(parent, key):
        request = GenerateJobCreate(model=JUDGE, prompts=["is this fine?"], chat=True, max_new_tokens=2,
                                    idempotency_key=key)
        with runtime.sessions() as s:
            return submit_job(s, request, runtime.settings, Sender()).job.id

    stale = left("edit-1", subjob_prefix("edit-1") + "a")
    other_edit = left("edit-2", subjob_prefix("edit-2") + "a")
    user_job = left(None, "edit-1")
    assert cancel_stale(runtime, "edit-1", None) == [stale]
    states = {j.id: j.state for j in subjobs(runtime)}
    assert states == {stale: "cancelled", other_edit: "queued", user_job: "queued"}


def test_the_edit_runner_counts_a_sub_job_failure_as_an_input_error():
    from workers.runners.edits import EditRunner

    runner = EditRunner(engine=None)
    assert runner.is_input_error(SubJobFailed("x")) and not runner.is_input_error(RuntimeError("x"))
