"""Audit runs on a real (migrated) SQLite database: fan-out into jobs, resume, scanning, report, diff, CSV."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from selfie_jobs import audit_detectors as D
from selfie_jobs import audits as A
from selfie_jobs.audit_models import AuditFinding, AuditRun, AuditRunJob, PromptSet
from selfie_jobs.audit_reports import iter_findings_csv, run_report
from selfie_jobs.models import Chunk, Job, Prompt, utcnow
from selfie_jobs.prompt_sets import create_prompt_set
from selfie_jobs.queue import RUN_CHUNK_TASK
from tests.unit.jobs.audits.support import RecordingSender, jsonl, run_all_chunks, scan_all, setup_db

PROMPTS = [
    "the cat sat on the mat",
    "a dog ran to the park",
    "the eiffel tower is located in paris",
    "paris , capital of france",
    "what meaning",
    "i will summarize the message",
    "the dog sat",
    "a cat ran",
    "sure",
    "the tower",
]

DETECTORS = [{"kind": "keywords", "name": "animals", "words": ["cat", "dog"], "min_relevancy": 0.2}]


def _audit(maker, settings, name="pets", prompts=PROMPTS, **kw):
    with maker() as session:
        ps = create_prompt_set(session, name + "-set", jsonl(prompts), "jsonl")
        req = A.AuditCreate(name=name, model="tiny", prompt_set=ps.name, detectors=DETECTORS,
                            targets={"layers": [0, 2, 4], "tokens": {"last": 2}}, **kw)
        audit = A.create_audit(session, req, settings)
        session.commit()
        return audit.id


def _start(maker, audit_id):
    with maker() as session:
        run, created = A.start_run(session, session.get(A.Audit, audit_id))
        session.commit()
        assert created
        return run.id


def _detect(configs=DETECTORS):
    built = D.build_all(configs)
    return lambda text, rel: D.detect(built, text, rel)


def test_the_api_checks_detectors_with_the_registry_the_workers_build_from():
    """One registry: a kind registered there is accepted by the audit schema, and what its factory refuses is refused
    there too, with the factory's message."""

    @D.register("test-length")
    def _length(config):
        if not isinstance(config.get("max_chars"), int):
            raise D.DetectorConfigError("max_chars must be an integer")
        return lambda text: []

    try:
        created = A.AuditCreate(name="x", prompt_set="s", detectors=[{"kind": "test-length", "max_chars": 5}])
        assert created.detectors[0].checked() == {"kind": "test-length", "name": "test-length", "min_relevancy": 0.0,
                                                  "max_chars": 5}
        with pytest.raises(ValueError, match="max_chars must be an integer"):
            A.AuditCreate(name="x", prompt_set="s", detectors=[{"kind": "test-length"}])
    finally:
        D._REGISTRY.pop("test-length")
    with pytest.raises(ValueError, match="unknown detector kind"):
        A.AuditCreate(name="x", prompt_set="s", detectors=[{"kind": "test-length", "max_chars": 5}])


def test_fan_out_makes_chunked_jobs_through_the_submission_path(sqlite_url):
    settings, maker = setup_db(sqlite_url)
    audit_id = _audit(maker, settings)
    run_id = _start(maker, audit_id)
    sender = RecordingSender()
    run = A.fan_out(maker, run_id, settings, sender, owner="w1")
    assert run.state == "running" and run.prompts_submitted == len(PROMPTS) and run.prompts_skipped == 0
    with maker() as session:
        rjs = session.scalars(select(AuditRunJob).where(AuditRunJob.run_id == run_id).order_by(AuditRunJob.batch)).all()
        # 4 prompts per job at most -> 3 jobs covering the set contiguously
        assert [(r.prompt_offset, r.prompt_count) for r in rjs] == [(0, 4), (4, 4), (8, 2)]
        jobs = session.scalars(select(Job).where(Job.audit_run_id == run_id)).all()
        assert len(jobs) == 3 and all(j.priority == 3 for j in jobs)
        total = sum(j.total for j in jobs)
        assert total == len(PROMPTS) * 3 * 2  # 3 layers x last 2 tokens
        for rj in rjs:
            texts = session.scalars(select(Prompt.text).where(Prompt.job_id == rj.job_id).order_by(Prompt.index)).all()
            assert texts == PROMPTS[rj.prompt_offset: rj.prompt_offset + rj.prompt_count]
        n_chunks = session.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id.in_([j.id for j in jobs])))
    assert [s[0] for s in sender.sent] == [RUN_CHUNK_TASK] * n_chunks


def test_an_audits_jobs_count_against_its_owners_daily_quota(sqlite_url):
    from selfie_jobs.auth import Principal, create_key

    settings, maker = setup_db(sqlite_url)
    with maker() as session:
        key, _ = create_key(session, "auditor", daily_quota=30)  # one full batch is 4 prompts x 6 = 24
        session.commit()
        who = Principal(key_id=key.id, is_admin=False)
        ps = create_prompt_set(session, "quota-set", jsonl(PROMPTS), "jsonl", owner_key_id=key.id)
        audit = A.create_audit(session, A.AuditCreate(name="quota", model="tiny", prompt_set=ps.name,
                                                      detectors=DETECTORS,
                                                      targets={"layers": [0, 2, 4], "tokens": {"last": 2}}),
                               settings, who)
        session.commit()
        audit_id = audit.id
    run = A.fan_out(maker, _start(maker, audit_id), settings, RecordingSender(), owner="w1")
    assert run.state == "failed"
    assert run.error.startswith("a batch was refused: daily quota exceeded: 24 of 30 interpretations used")
    with maker() as session:
        jobs = session.scalars(select(Job).where(Job.audit_run_id == run.id)).all()
        assert [(j.total, j.owner_key_id) for j in jobs] == [(24, key.id)]


def test_an_audit_over_another_keys_prompt_set_stored_before_the_check_does_not_run(sqlite_url):
    """create_audit now refuses another key's set; an audit stored before that must not show its prompts either."""
    from selfie_jobs.auth import create_key

    settings, maker = setup_db(sqlite_url)
    with maker() as session:
        alice, _ = create_key(session, "alice")
        bob, _ = create_key(session, "bob")
        admin, _ = create_key(session, "admin", admin=True)
        ps = create_prompt_set(session, "alice-set", jsonl(PROMPTS), "jsonl", owner_key_id=alice.id)
        audits = {}
        for key in (bob, alice, admin):
            audit = A.Audit(name=f"by-{key.name}", model="tiny", prompt_set_id=ps.id, owner_key_id=key.id,
                            targets={"layers": [0], "tokens": {"last": 1}}, detectors=DETECTORS)
            session.add(audit)
            session.flush()
            audits[key.name] = audit.id
        session.commit()
    runs = {name: A.fan_out(maker, _start(maker, audit_id), settings, RecordingSender(), owner="w1")
            for name, audit_id in audits.items()}
    assert runs["bob"].state == "failed" and "may not use prompt set" in runs["bob"].error
    assert runs["alice"].state == runs["admin"].state == "running"
    with maker() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.audit_run_id == runs["bob"].id)) == 0


def test_short_prompts_get_fewer_last_tokens_and_too_long_ones_are_skipped(sqlite_url):
    settings, maker = setup_db(sqlite_url)
    long_prompt = " ".join(["cat"] * 60)  # over the tiny model's 48-token context
    prompts = ["sure", "the cat sat", long_prompt, "a dog ran to the park"]
    with maker() as session:
        ps = create_prompt_set(session, "mixed", jsonl(prompts), "jsonl")
        audit = A.create_audit(session, A.AuditCreate(name="m", model="tiny", prompt_set=ps.name, detectors=DETECTORS,
                               targets={"layers": [1], "tokens": {"last": 3}}), settings)
        session.commit()
        audit_id = audit.id
    run_id = _start(maker, audit_id)
    run = A.fan_out(maker, run_id, settings, RecordingSender(), owner="w1")
    assert run.state == "running" and run.prompts_skipped == 1 and run.prompts_submitted == 4
    with maker() as session:
        rjs = session.scalars(select(AuditRunJob).where(AuditRunJob.run_id == run_id).order_by(AuditRunJob.batch)).all()
        # "sure" has 2 tokens (<s> sure): its own job; the long prompt ends a batch; offsets stay aligned
        assert [(r.prompt_offset, r.prompt_count) for r in rjs] == [(0, 1), (1, 1), (3, 1)]
        assert [session.get(Job, r.job_id).total for r in rjs] == [2, 3, 3]


def test_fan_out_resumes_after_a_crash_without_duplicates(database_url):
    settings, maker = setup_db(database_url)
    audit_id = _audit(maker, settings)
    run_id = _start(maker, audit_id)
    run = A.fan_out(maker, run_id, settings, RecordingSender(), owner="w1", stop_after=1)  # "crash" after one batch
    assert run.state == "submitting" and run.prompts_submitted == 4
    # Another driver cannot take over while the lease holds ...
    assert A.fan_out(maker, run_id, settings, RecordingSender(), owner="w2").prompts_submitted == 4
    with maker() as session:
        assert A.runs_to_resume(session) == []
        session.get(AuditRun, run_id).lease_expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
        assert A.runs_to_resume(session) == [run_id]
    # ... but resumes once it ran out
    run = A.fan_out(maker, run_id, settings, RecordingSender(), owner="w2")
    assert run.state == "running" and run.prompts_submitted == len(PROMPTS)
    with maker() as session:
        rjs = session.scalars(select(AuditRunJob).where(AuditRunJob.run_id == run_id).order_by(AuditRunJob.batch)).all()
        assert [(r.batch, r.prompt_offset, r.prompt_count) for r in rjs] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
        assert session.scalar(select(func.count()).select_from(Job).where(Job.audit_run_id == run_id)) == 3


def test_scan_report_diff_and_csv(database_url):
    settings, maker = setup_db(database_url)
    audit_id = _audit(maker, settings)

    def first_texts(job_id, p, layer, token):
        return ("a cat" if layer == 2 else "a dog" if layer == 4 else "nothing", 0.5 if layer else 0.9)

    run1 = _start(maker, audit_id)
    A.fan_out(maker, run1, settings, RecordingSender(), owner="w1")
    run_all_chunks(maker, first_texts)
    with maker() as session:  # a job not finished yet is not scanned
        assert len(A.jobs_to_scan(session, run1)) == 3
    scan_all(maker, _detect())
    with maker() as session:
        run = session.get(AuditRun, run1)
        assert run.state == "succeeded" and run.jobs_scanned == 3
        assert run.flags == len(PROMPTS) * 2 * 2  # layers 2 and 4, 2 tokens each
        report = run_report(session, run, top=5)
        assert {r["key"]: r["flags"] for r in report["by_layer"]} == {2: 20, 4: 20}
        assert {r["key"]: r["flags"] for r in report["by_token_from_end"]} == {-2: 20, -1: 20}
        assert report["flagged_prompts"] == len(PROMPTS)
        top = report["top"][0]
        assert top["prompt"] in PROMPTS and top["label"] in {"cat", "dog"} and "context" in top
        assert report["diff"]["previous_run_id"] is None

    def second_texts(job_id, p, layer, token):  # the dog at layer 4 is gone; a cat appears at layer 0
        return ("a cat" if layer in (0, 2) else "nothing", 0.5)

    run2 = _start(maker, audit_id)
    A.fan_out(maker, run2, settings, RecordingSender(), owner="w1")
    run_all_chunks(maker, second_texts)
    scan_all(maker, _detect())
    with maker() as session:
        report = run_report(session, session.get(AuditRun, run2))
        diff = report["diff"]
        assert diff["previous_run_id"] == run1
        assert diff["new_count"] == 20 and {f["layer"] for f in diff["new"]} == {0}
        assert diff["gone_count"] == 20 and {f["layer"] for f in diff["gone"]} == {4}
        text = "".join(iter_findings_csv(session, run2, page=7))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 40 and {r["label"] for r in rows} == {"cat"} and rows[0]["prompt"] in PROMPTS


def test_min_relevancy_and_scan_is_once(sqlite_url):
    settings, maker = setup_db(sqlite_url)
    audit_id = _audit(maker, settings)
    run_id = _start(maker, audit_id)
    A.fan_out(maker, run_id, settings, RecordingSender(), owner="w1")
    with maker() as session:  # jobs still to run: nothing to explain
        assert "waiting" not in A.run_progress(session, session.get(AuditRun, run_id))
    run_all_chunks(maker, lambda j, p, layer, t: ("cat", 0.1))  # below min_relevancy 0.2
    with maker() as session:
        rj = A.jobs_to_scan(session, run_id)[0]
        assert A.scan_job(session, rj, _detect()) == 0
        session.commit()
        assert A.scan_job(session, rj, _detect()) is None  # already scanned
    with maker() as session:  # finished jobs, not yet scanned: the run says what closes it
        assert "closed by the scheduler's next audit tick" in A.run_progress(session, session.get(AuditRun, run_id))["waiting"]
    scan_all(maker, _detect())
    with maker() as session:
        assert session.scalar(select(func.count()).select_from(AuditFinding)) == 0
        assert session.get(AuditRun, run_id).state == "succeeded"
        assert "waiting" not in A.run_progress(session, session.get(AuditRun, run_id))


def test_a_run_whose_pattern_times_out_fails_and_the_others_are_scanned(sqlite_url):
    """A pattern that backtracks without end fails its own run with the reason; left open, its job would come
    first in every tick and hold up every other run's scanning."""
    from workers import audits as W

    settings, maker = setup_db(sqlite_url)
    slow_id = _audit(maker, settings, name="slow")
    with maker() as session:
        audit = session.get(A.Audit, slow_id)
        audit.detectors = [{"kind": "regex", "name": "runaway", "patterns": [r"(a|aa)+$"]}]
        session.commit()
    slow_run = _start(maker, slow_id)
    A.fan_out(maker, slow_run, settings, RecordingSender(), owner="w1")
    run_all_chunks(maker, lambda j, p, layer, t: ("a" * 60 + "b", 0.5))
    pets_run = _start(maker, _audit(maker, settings, name="pets"))
    A.fan_out(maker, pets_run, settings, RecordingSender(), owner="w1")
    run_all_chunks(maker, lambda j, p, layer, t: ("a cat", 0.5))

    assert W.scan_ready(maker) == 3  # the pets run's three jobs
    with maker() as session:
        slow, pets = session.get(AuditRun, slow_run), session.get(AuditRun, pets_run)
        assert slow.state == "failed" and slow.error.startswith("scanning: detector 'runaway': the pattern")
        assert pets.state == "succeeded"
        assert session.scalar(select(func.count()).select_from(AuditFinding)
                              .where(AuditFinding.run_id == slow_run)) == 0


def test_a_run_whose_detectors_cannot_be_built_fails_instead_of_waiting_for_ever(sqlite_url):
    from workers import audits as W

    settings, maker = setup_db(sqlite_url)
    audit_id = _audit(maker, settings)
    with maker() as session:  # stored before the API checked concepts' terms
        session.get(A.Audit, audit_id).detectors = [{"kind": "concepts", "concepts": {"x": 5}}]
        session.commit()
    run_id = _start(maker, audit_id)
    out = W.run_audit(maker, settings, RecordingSender(), audit_id, run_id)
    assert out["state"] == "failed" and out["error"] == "detectors: detector 'concepts': concept 'x' needs a list of terms, not int"
    with maker() as session:
        assert session.get(AuditRun, run_id).state == "failed"


def test_cancel_run_cancels_its_jobs(sqlite_url):
    settings, maker = setup_db(sqlite_url)
    run_id = _start(maker, _audit(maker, settings))
    A.fan_out(maker, run_id, settings, RecordingSender(), owner="w1")
    with maker() as session:
        A.cancel_run(session, session.get(AuditRun, run_id))
        session.commit()
        states = set(session.scalars(select(Job.state).where(Job.audit_run_id == run_id)))
        assert states == {"cancelled"}
        assert set(session.scalars(select(Chunk.state))) == {"cancelled"}


def test_one_open_run_per_audit_and_cron_claims(sqlite_url):
    settings, maker = setup_db(sqlite_url)
    audit_id = _audit(maker, settings, schedule="*/5 * * * *")
    with maker() as session:
        audit = session.get(A.Audit, audit_id)
        assert audit.next_run_at is not None
        r1, c1 = A.start_run(session, audit, "schedule")
        r2, c2 = A.start_run(session, audit, "manual")
        assert c1 and not c2 and r1.id == r2.id
        audit.next_run_at = utcnow() - timedelta(minutes=1)
        session.commit()
        assert A.claim_due_audits(session) == [audit_id]
        assert A.claim_due_audits(session) == []  # advanced: fires again only at the next cron time
        session.commit()
        assert A.next_fire("*/5 * * * *", utcnow()) - utcnow() <= timedelta(minutes=5)


def test_concurrent_starts_make_one_run(database_url):
    """A manual start and the beat's, in two transactions: the second waits for the first and returns its run."""
    from sqlalchemy.orm import Session

    from selfie_jobs.db import create_db_engine
    from tests.locksupport import LockStep

    settings, maker = setup_db(database_url)
    audit_id = _audit(maker, settings)
    other = create_db_engine(database_url)

    def beat_start():
        with Session(other) as session:
            run, created = A.start_run(session, session.get(A.Audit, audit_id), "schedule")
            session.commit()
            return run.id, created

    try:
        with maker() as session:
            manual, created = A.start_run(session, session.get(A.Audit, audit_id), "manual")
            assert created
            beat = LockStep(other, beat_start).start()
            session.commit()
        assert beat.join() == (manual.id, False)
    finally:
        other.dispose()
    with maker() as session:
        assert session.scalar(select(func.count()).select_from(AuditRun)) == 1


def test_schemas_reject_bad_configs():
    with pytest.raises(ValueError, match="cron"):
        A.AuditCreate(name="x", prompt_set="s", detectors=DETECTORS, schedule="every day")
    with pytest.raises(ValueError, match="regular expression"):
        A.AuditCreate(name="x", prompt_set="s", detectors=[{"kind": "regex", "patterns": ["(bad"]}])
    with pytest.raises(ValueError, match="unknown detector kind"):
        A.AuditCreate(name="x", prompt_set="s", detectors=[{"kind": "magic"}])
    with pytest.raises(ValueError, match="'words' must be a non-empty list"):
        A.AuditCreate(name="x", prompt_set="s", detectors=[{"kind": "keywords"}])


def test_builtin_prompt_sets_are_used_by_name(sqlite_url):
    settings, maker = setup_db(sqlite_url)
    with maker() as session:
        audit = A.create_audit(session, A.AuditCreate(name="inj", model="tiny", prompt_set="prompt_injections",
                               detectors=DETECTORS), settings)
        session.commit()
        ps = session.get(PromptSet, audit.prompt_set_id)
        assert ps.source == "builtin" and ps.size >= 10


def test_audit_options_are_the_job_engine_options():
    """One engine-options schema: an audit accepts what a job accepts, with the same defaults (k was capped at
    10,000 and max_new_tokens defaulted to 20 in a copy of its own); the audit's priority stays below jobs'."""
    from selfie_jobs.specs import EngineOptions, JobCreate

    assert issubclass(A.AuditOptions, EngineOptions) and issubclass(JobCreate, EngineOptions)
    options, job = A.AuditOptions(), JobCreate(prompts=["x"])
    assert {name: getattr(options, name) for name in EngineOptions.model_fields} == \
           {name: getattr(job, name) for name in EngineOptions.model_fields}
    assert options.max_new_tokens == 30 and options.priority == 3 and job.priority == 5
    assert A.AuditOptions(k=1_000_000).k == 1_000_000
    with pytest.raises(ValueError):
        A.AuditOptions(k=1_000_001)
    # New audits store every default written out, so a later change of a default never changes a stored audit...
    stored = A.AuditCreate(name="x", prompt_set="s", detectors=DETECTORS).options.model_dump(mode="json",
                                                                                               exclude_none=True)
    assert stored["max_new_tokens"] == 30
    # ...and an audit stored under the old default (20) keeps it in the jobs its runs submit.
    config = {"model": "tiny", "targets": {"layers": "all"},
              "options": {**stored, "max_new_tokens": 20}}
    assert A._job_request(config, ["a prompt"], "all", "key").max_new_tokens == 20
