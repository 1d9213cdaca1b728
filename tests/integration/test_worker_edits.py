"""Edit jobs on a real worker (`python -m workers worker`, Celery prefork, real Redis and database, the tiny random
LLaMA): both kinds train, store their epochs as they go and exactly one variant, whose file checks against its
SHA-256; an interpret job submitted while an edit trains finishes before the edit (the worker serves it between
epochs); a cancel stops an edit within about one epoch; a worker child killed mid-edit restarts the edit from
scratch and still stores exactly one variant."""

from __future__ import annotations

import os
import re
import signal
from collections import Counter

import pytest
from sqlalchemy import func, select

from selfie_jobs.kinds.edit_requests import ReinforceEditCreate, SupervisedEditCreate
from selfie_jobs.models import Chunk, EditEpoch, Job, Variant, Worker
from selfie_jobs.queries import cancel_job
from selfie_jobs.variants import store_root, verified_file
from tests.integration.test_worker import REFS, private_redis_url, stack, tiny_model_dir  # noqa: F401 - fixtures
from tests.integration.worker_support import MODEL, PROMPTS, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def supervised(epochs: int = 4, **kw) -> SupervisedEditCreate:
    body = {"model": MODEL, "source": {"prompt": PROMPTS[0], "layer": 1, "token": -1},
            "target": {"prompt": PROMPTS[1], "layer": 2, "token": -1}, "reference_texts": REFS, "epochs": epochs,
            "lr": 1e-3, "max_new_tokens": 4,
            "evaluations": {"knowledge": {"facts": [{"prompt": "The Eiffel Tower is in", "attribute": "Paris"}]},
                            "behaviour": {"requests": ["Tell me about the tower"],
                                          "detector": {"kind": "keywords", "words": ["the"]}, "max_new_tokens": 4}}}
    return SupervisedEditCreate(**{**body, **kw})


def reinforce(epochs: int = 3, **kw) -> ReinforceEditCreate:
    body = {"model": MODEL, "prompt": PROMPTS[0], "layer": 1, "epochs": epochs, "lr": 1e-2, "k": 1,
            "max_new_tokens": 4, "judge": {"type": "keywords", "words": ["the", "a", "is"]}}
    return ReinforceEditCreate(**{**body, **kw})


def epochs_done(stack, job: str) -> int:
    with stack.db() as s:
        return s.scalar(select(func.count()).select_from(EditEpoch).where(EditEpoch.job_id == job))


def variants(stack, job: str) -> list[Variant]:
    with stack.db() as s:
        return list(s.scalars(select(Variant).where(Variant.job_id == job)))


def assert_one_variant(stack, job: str, method: str, epochs: int) -> Variant:
    stack.assert_exactly_once(job)
    (variant,) = variants(stack, job)
    assert variant.method == method and variant.layer == 1 and variant.model == MODEL
    assert [row["epoch"] for row in variant.losses] == list(range(epochs))
    assert epochs_done(stack, job) == epochs
    assert verified_file(store_root(stack.settings), variant.path, variant.sha256).is_file()
    assert variant.settings["method"] == method and variant.settings["epochs"] == epochs
    return variant


@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
def test_both_edit_kinds_store_their_epochs_and_one_variant(stack):
    worker = stack.start_worker("w1", SELFIE_VARIANT_STORE_DIR=str(store_root(stack.settings)))
    stack.wait_ready(worker)
    a = stack.submit(supervised())
    b = stack.submit(reinforce())
    stack.wait_jobs(a, b)
    first = assert_one_variant(stack, a, "supervised", 4)
    ev = first.evaluations
    assert ev["objective"]["name"] == "source_distance" and ev["interpretation"]["target"] is not None
    assert ev["knowledge"]["facts"] == 1 and ev["behaviour"]["requests"] == 1
    assert set(ev["behaviour"]["variant"]) == {"plain_hit_rate", "injected_hit_rate"}
    assert first.settings["reference_texts"] == len(REFS)
    second = assert_one_variant(stack, b, "reinforce", 3)
    assert second.evaluations["objective"]["name"] == "bad_share"
    with stack.db() as s:
        rows = s.scalars(select(EditEpoch).where(EditEpoch.job_id == b).order_by(EditEpoch.epoch)).all()
    assert all(r.rewards and r.interpretations and r.bad_share is not None for r in rows)
    assert "selfie.run_edit[" in worker.log()
    on_variant = stack.submit(stack.request(variant=first.id))  # the stored variant serves interpretations
    stack.wait_jobs(on_variant)
    stack.assert_exactly_once(on_variant)


def _edit_worker(stack, name="w1"):
    worker = stack.start_worker(name, batch_size=4, SELFIE_VARIANT_STORE_DIR=str(store_root(stack.settings)))
    stack.wait_ready(worker)
    return worker


@SQLITE
def test_an_interpret_job_submitted_while_an_edit_trains_finishes_first_and_a_cancel_stops_the_edit(stack):
    worker = _edit_worker(stack)
    edit = stack.submit(reinforce(epochs=1000, max_new_tokens=8))
    wait_for(lambda: epochs_done(stack, edit) >= 2, 60, what="the edit's first epochs")
    job = stack.submit(stack.request())
    stack.wait_jobs(job, timeout=60)
    stack.assert_exactly_once(job)
    with stack.db() as s:
        assert s.get(Job, edit).state == "running"  # the interpret job did not wait for the edit
    with stack.db() as s, s.begin():
        cancel_job(s, edit, _admin())
    at_cancel = epochs_done(stack, edit)
    (done,) = stack.wait_jobs(edit, timeout=30)
    assert done.state == "cancelled"
    # the edit's engine run ends with nothing stored
    wait_for(lambda: re.search(r"engine run \w+: 1 chunks of 1 jobs, 1 items, 0 rows new", worker.log()), 30,
             what="the worker letting go of the edit")
    assert epochs_done(stack, edit) <= at_cancel + 1  # stopped at the end of the epoch the cancel landed in
    assert variants(stack, edit) == []
    with stack.db() as s:
        assert s.scalar(select(Chunk.state).where(Chunk.job_id == edit)) == "cancelled"
    # the interpret job's own messages, taken once the edit let the process go, find it done: acknowledged
    wait_for(lambda: "nothing to do (this worker finished it)" in worker.log(), 30, what="the messages acknowledged")


def _admin():
    from selfie_jobs.auth import Principal

    return Principal(key_id=None, is_admin=True)


@SQLITE
@pytest.mark.parametrize("kind", ["supervised", "reinforce"])
def test_sigkill_mid_edit_restarts_it_and_stores_exactly_one_variant(stack, kind):
    worker = _edit_worker(stack)
    (child,) = worker.children()
    epochs = 400 if kind == "supervised" else 60
    job = stack.submit(supervised(epochs=epochs) if kind == "supervised" else reinforce(epochs=epochs))
    wait_for(lambda: epochs_done(stack, job) >= 3, 60, interval=0.05, what="the edit's first epochs")
    os.kill(child, signal.SIGKILL)
    assert variants(stack, job) == []
    stack.wait_jobs(job, timeout=180)
    assert_one_variant(stack, job, kind, epochs)
    with stack.db() as s:
        (chunk,) = s.scalars(select(Chunk).where(Chunk.job_id == job)).all()
    assert chunk.attempts >= 2 and child not in worker.children()
    received = Counter(re.findall(r"selfie\.run_edit\[([0-9a-f-]+)\] received", worker.log()))
    assert received.most_common(1)[0][1] == 2, received


@SQLITE
def test_the_heartbeat_keeps_a_long_edits_lease(stack):
    import time

    from selfie_jobs.chunks import as_utc
    from selfie_jobs.models import utcnow

    worker = stack.start_worker("w1", SELFIE_LEASE_SECONDS="5",
                                SELFIE_VARIANT_STORE_DIR=str(store_root(stack.settings)))
    stack.wait_ready(worker)
    edit = stack.submit(reinforce(epochs=1000, max_new_tokens=8))
    wait_for(lambda: epochs_done(stack, edit) >= 1, 60, what="the edit's first epoch")
    started = time.monotonic()
    while time.monotonic() - started < 12:  # over twice the lease
        with stack.db() as s:
            chunk = s.scalars(select(Chunk).where(Chunk.job_id == edit)).one()
            assert chunk.state == "running" and as_utc(chunk.lease_expires_at) > utcnow(), "the lease ran out"
        time.sleep(0.5)
    with stack.db() as s, s.begin():
        cancel_job(s, edit, _admin())
    stack.wait_jobs(edit, timeout=30)
    with stack.db() as s:
        assert s.scalars(select(Chunk.attempts).where(Chunk.job_id == edit)).one() == 1


@SQLITE
def test_a_judge_on_another_served_model_answers_through_generate_jobs_on_its_queue(stack):
    from selfie_jobs.models import Generation

    judge_model = "tiny-judge"
    edits = _edit_worker(stack)
    judge = stack.start_worker("w2", model=judge_model)
    stack.wait_ready(judge)
    job = stack.submit(reinforce(epochs=2, judge={"type": "model", "model": judge_model, "max_new_tokens": 3}))
    stack.wait_jobs(job)
    variant = assert_one_variant(stack, job, "reinforce", 2)
    with stack.db() as s:
        subjobs = s.scalars(select(Job).where(Job.model == judge_model, Job.kind == "generate")).all()
        answered = s.scalar(select(func.count()).select_from(Generation)
                            .where(Generation.job_id.in_([j.id for j in subjobs])))
        positions = len(s.get(Job, job).spec["prompt"].split())
    # one sub-job per epoch and one for the variant's judged-bad share, each answering every position
    assert len(subjobs) == 3 and {j.state for j in subjobs} == {"succeeded"}
    assert answered == sum(j.total for j in subjobs) and all(j.total > positions / 2 for j in subjobs)
    assert variant.settings["judge"]["remote"] is True
    assert "selfie.run_chunk[" in judge.log() and "selfie.run_chunk[" not in edits.log()


@SQLITE
def test_a_cancel_while_the_edit_waits_for_its_judge_cancels_the_sub_job_too(stack):
    judge_model = "tiny-judge"
    _edit_worker(stack).stop()  # the edited model's card stays
    judge = stack.start_worker("w2", model=judge_model)
    stack.wait_ready(judge)
    # accepted while the judge is served (submission refuses a judge model nobody serves); it stops before an
    # edit worker runs again, so the edit's sub-job waits
    job = stack.submit(reinforce(epochs=2, judge={"type": "model", "model": judge_model}))
    judge.stop()
    edits = _edit_worker(stack, "w3")

    def waiting_subjob():
        with stack.db() as s:
            return s.scalars(select(Job).where(Job.model == judge_model, Job.kind == "generate")).first()

    subjob = wait_for(waiting_subjob, 60, what="the judge's sub-job")
    with stack.db() as s, s.begin():
        cancel_job(s, job, _admin())
    stack.wait_jobs(job, timeout=30)
    wait_for(lambda: re.search(r"engine run \w+: 1 chunks of 1 jobs, 1 items, 0 rows new", edits.log()), 30,
             what="the edit letting go")
    with stack.db() as s:
        assert s.get(Job, job).state == "cancelled" and s.get(Job, subjob.id).state == "cancelled"
    assert variants(stack, job) == [] and epochs_done(stack, job) == 0


def _store_files(stack, job: str) -> list[str]:
    root = store_root(stack.settings)
    return [str(p) for p in root.rglob("*") if p.is_file() and job in p.parts]


@SQLITE
def test_edits_that_would_fail_again_fail_once_with_the_reason_and_store_nothing(stack):
    """A diverging edit, a judge model with a card but no live worker, a judge's sub-job refused by the quota: each
    edit fails at its first attempt with the reason (no retry restarting training), nothing stored."""
    from selfie_jobs import submission
    from selfie_jobs.auth import create_key

    from selfie_jobs.errors import SubmissionError
    from selfie_jobs.liveness import live_workers

    judge_model = "tiny-judge"
    judge = stack.start_worker("w2", model=judge_model)
    first = stack.start_worker("w0")  # writes the edited model's card, then stops: the edits wait for "w1"
    stack.wait_ready(judge)
    stack.wait_ready(first)
    first.stop()
    # submitted while the judge model is served (submission refuses a judge nobody serves); its worker then stops
    # before the edit's first judge call, so the sub-job is never started
    unserved = stack.submit(reinforce(epochs=2, judge={"type": "model", "model": judge_model}))
    with stack.db() as s:
        key, _ = create_key(s, "small", daily_quota=3)
        s.commit()
        # a judge's generations past the key's quota: refused at submission (1 + epochs x positions items)
        with pytest.raises(SubmissionError, match="quota"):
            submission.submit_job(s, reinforce(epochs=2, judge={"type": "model", "model": judge_model}),
                                  stack.settings, stack.producer, owner_key_id=key.id)
    judge.stop()
    with stack.db() as s:
        # gone at once, not after worker_alive_seconds
        s.query(Worker).delete(synchronize_session=False)  # both have stopped; "w1" is not started yet
        s.commit()
        assert not live_workers(s, stack.settings.worker_alive_seconds, model=judge_model)
    worker = stack.start_worker("w1", SELFIE_VARIANT_STORE_DIR=str(store_root(stack.settings)),
                                SELFIE_SUBJOB_START_SECONDS="3")
    stack.wait_ready(worker)
    diverging = stack.submit(supervised(epochs=3, target=None, target_vector=[3.0e38] * 32, lr=10.0, beta=1e6))
    stack.wait_jobs(diverging, unserved, timeout=120)
    reasons = {diverging: "training diverged at epoch 0: the loss is not finite; lower lr or beta",
               unserved: f"the judge model '{judge_model}' has no live worker"}
    with stack.db() as s:
        for job, reason in reasons.items():
            row = s.get(Job, job)
            assert row.state == "failed" and reason in row.error, (row.state, row.error)
            assert s.scalars(select(Chunk.attempts).where(Chunk.job_id == job)).one() == 1
        subjobs = s.scalars(select(Job).where(Job.model == judge_model, Job.kind == "generate")).all()
    assert [j.state for j in subjobs] == ["cancelled"]  # the unserved one's, cancelled when its wait ended
    for job in reasons:
        assert variants(stack, job) == [] and _store_files(stack, job) == []


@SQLITE
def test_a_cancel_during_a_long_evaluation_stops_it_soon_and_other_work_runs_meanwhile(stack):
    import time

    worker = _edit_worker(stack)
    edit = stack.submit(supervised(epochs=1, evaluations={"behaviour": {
        "requests": [f"request number {i}" for i in range(500)], "max_new_tokens": 200,
        "detector": {"kind": "keywords", "words": ["zzz"]}}}))
    wait_for(lambda: epochs_done(stack, edit) >= 1, 60, what="the edit's epoch")  # it evaluates now
    started = time.monotonic()
    job = stack.submit(stack.request())
    stack.wait_jobs(job, timeout=60)
    assert time.monotonic() - started < 20  # served between evaluation steps, not after the evaluation
    with stack.db() as s:
        assert s.get(Job, edit).state == "running"
    with stack.db() as s, s.begin():
        cancel_job(s, edit, _admin())
    cancelled = time.monotonic()
    wait_for(lambda: re.search(r"engine run \w+: 1 chunks of 1 jobs, 1 items, 0 rows new", worker.log()), 60,
             interval=0.2, what="the worker letting go of the edit")
    assert time.monotonic() - cancelled < 20
    assert variants(stack, edit) == [] and _store_files(stack, edit) == []
