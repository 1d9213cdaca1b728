"""Retention against real SQLite and PostgreSQL: which jobs expire, and a purge that deletes them with everything
hanging off them (results of every kind, prompts, vector inputs, chunks, engine runs, audit runs and findings),
in small batches, never a running job, and twice in a row the same as once."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from selfie_jobs import retention
from selfie_jobs.audit_models import AuditFinding, AuditRun, AuditRunJob, PromptSet
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.models import (
    ApiKey,
    Chunk,
    EngineRun,
    Interpretation,
    Job,
    JobVector,
    Prompt,
    VectorInterpretation,
)
from selfie_jobs.settings import Settings
from tests.unit.jobs.factories import make_job

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)
TABLES = (Job, Prompt, Chunk, Interpretation, VectorInterpretation, JobVector, EngineRun, AuditRun, AuditRunJob,
          AuditFinding)


@pytest.fixture
def db(migrated_database_url):
    return get_sessionmaker(migrated_database_url)


def _settings(**values) -> Settings:
    return Settings(purge_batch_rows=3, **values)


def _key(session, name: str, ttl: int | None) -> int:
    key = ApiKey(name=name, prefix=f"sk-selfie-{name:0<6}"[:16], key_hash=name * 8, job_ttl_seconds=ttl)
    session.add(key)
    session.flush()
    return key.id


def _job(session, *, key: int | None, state: str = "succeeded", ttl: int | None = None, kind: str = "interpret",
         created: datetime = NOW - 3 * DAY, finished: datetime | None = NOW - 2 * DAY, rows: int = 4,
         engine_run: str = "", audit_run: int | None = None) -> str:
    items = [(0, layer, 0) for layer in range(rows)] if kind == "interpret" else [(i,) for i in range(rows)]
    job = make_job(session, items=items, chunk_size=2, created_at=created)
    job.owner_key_id, job.state, job.ttl_seconds, job.kind = key, state, ttl, kind
    job.finished_at = finished if state in ("succeeded", "failed", "cancelled") else None
    job.audit_run_id = audit_run
    chunk_id = session.scalar(select(Chunk.id).where(Chunk.job_id == job.id).order_by(Chunk.index))
    for i, item in enumerate(items):
        common = dict(job_id=job.id, text=f"text {i}", token_ids=[1, 2], relevancy=[0.5, 0.25], mean_relevancy=0.375,
                      chunk_id=chunk_id, engine_run_id=engine_run or "run-" + job.id[:8], worker="w", model="tiny")
        if kind == "interpret":
            session.add(Interpretation(prompt_index=0, layer=item[1], token=0, source_token="t", **common))
        else:
            session.add(VectorInterpretation(vector_index=i, label="v", norm=1.0, **common))
            session.add(JobVector(job_id=job.id, index=i, label="v", vector=[0.5, 0.5]))
    session.flush()
    return job.id


def _engine_run(session, run_id: str, job_ids: list[str], started: datetime = NOW - 2 * DAY) -> None:
    session.add(EngineRun(id=run_id, worker="w", model="tiny", size=1, chunk_ids=[], job_ids=job_ids,
                          started_at=started, elapsed_s=0.1))


def _counts(db) -> dict[str, int]:
    with db() as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in TABLES}


def _left(db, table, column) -> set:
    with db() as session:
        return set(session.scalars(select(column).select_from(table).distinct()))


def test_expired_jobs_go_with_everything_hanging_off_them_and_nothing_else(db):
    with db() as s, s.begin():
        short = _key(s, "short", 3600)  # its jobs live an hour after they finished
        keeper = _key(s, "keeper", None)  # no key default: the settings' (none: for ever)
        expired = _job(s, key=short, engine_run="shared")
        kept_forever = _job(s, key=keeper, engine_run="shared")  # shares an engine run with `expired`
        own_ttl = _job(s, key=short, ttl=10 * 86400)  # its own time to live beats its key's
        running = _job(s, key=short, state="running", rows=2)
        s.get(Job, running).finished_at = NOW - 2 * DAY  # a stray finish time does not make a running job expire
        queued = _job(s, key=short, state="queued", rows=0)
        vectors = _job(s, key=short, kind="vectors", rows=5)
        cancelled = _job(s, key=keeper, state="cancelled", ttl=60, finished=NOW - timedelta(minutes=2))
        young = _job(s, key=short, ttl=60, created=NOW - timedelta(hours=1), finished=NOW - timedelta(minutes=30))  # in the quota's 24 hours
        _engine_run(s, "shared", [expired, kept_forever])
        _engine_run(s, "run-" + cancelled[:8], [cancelled])
        _engine_run(s, "run-" + vectors[:8], [vectors])
        _engine_run(s, "no-rows-old", [expired], started=NOW - 10 * DAY)  # older than every job: served none left
    before = _counts(db)

    report = retention.purge_expired(db, _settings(), now=NOW)

    assert report.as_dict() == {"jobs": 3, "results": 4 + 5 + 4, "audit_runs": 0, "findings": 0,
                                "engine_runs": 3}
    assert _left(db, Job, Job.id) == {kept_forever, own_ttl, running, queued, young}
    for table in (Prompt, Chunk, Interpretation, VectorInterpretation, JobVector):
        assert not _left(db, table, table.job_id) & {expired, vectors, cancelled}, table.__tablename__
    assert _left(db, Interpretation, Interpretation.job_id) == {kept_forever, own_ttl, running, young}
    assert _left(db, EngineRun, EngineRun.id) == {"shared"}  # kept_forever still holds it
    after = _counts(db)
    assert after["interpretations"] == before["interpretations"] - 8
    assert after["vector_interpretations"] == after["job_vectors"] == 0

    # twice is once: nothing more is expired
    again = retention.purge_expired(db, _settings(), now=NOW)
    assert not any(again.as_dict().values()) and _counts(db) == after

    # a default time to live applies to the jobs stored without one, at the next purge; running ones stay
    report = retention.purge_expired(db, _settings(job_ttl_seconds=86400), now=NOW)
    assert report.jobs == 1 and report.engine_runs == 1  # kept_forever, and the engine run it shared
    assert _left(db, Job, Job.id) == {own_ttl, running, queued, young}
    later = retention.purge_expired(db, _settings(job_ttl_seconds=1), now=NOW + 20 * DAY)
    assert later.jobs == 2  # own_ttl and young; never the queued or the running job
    assert _left(db, Job, Job.id) == {running, queued}
    assert _left(db, Chunk, Chunk.job_id) == {running}  # the queued job has no items


def test_a_time_to_live_raised_meanwhile_stops_the_purge(db):
    with db() as s, s.begin():
        key = _key(s, "k", 60)
        job = _job(s, key=key, rows=7)
    with db() as s, s.begin():
        assert retention.expired_jobs(s, NOW, None) == [job]
        s.get(ApiKey, key).job_ttl_seconds = 100 * 86400
    report = retention.purge_expired(db, _settings(), now=NOW)
    assert not any(report.as_dict().values())
    assert _left(db, Interpretation, Interpretation.job_id) == {job}


def _audit_run(session, state: str) -> int:
    pset = PromptSet(name=f"set {state}", size=1)
    session.add(pset)
    session.flush()
    from selfie_jobs.audit_models import Audit

    audit = Audit(name=f"audit {state}", model="tiny", prompt_set_id=pset.id, targets={}, detectors=[])
    session.add(audit)
    session.flush()
    run = AuditRun(audit_id=audit.id, state=state, config={}, jobs_total=2, flags=2)
    session.add(run)
    session.flush()
    return run.id


def _link(session, run_id: int, batch: int, job_id: str, findings: int) -> None:
    session.add(AuditRunJob(run_id=run_id, batch=batch, job_id=job_id, prompt_offset=batch, prompt_count=1,
                            scanned=True, flags=findings))
    for n in range(findings):
        session.add(AuditFinding(run_id=run_id, job_id=job_id, prompt_index=0, item_index=batch, layer=n, token=0,
                                 token_from_end=-1, source_token="t", detector="d", label=f"l{n}", match="m",
                                 text="t", mean_relevancy=0.5, fingerprint=f"{job_id}{n}"))


def test_an_audit_run_goes_whole_once_every_job_of_it_expired(db):
    with db() as s, s.begin():
        key = _key(s, "auditor", 3600)
        closed = _audit_run(s, "succeeded")
        early = _job(s, key=key, audit_run=closed)
        late = _job(s, key=key, audit_run=closed, finished=NOW - timedelta(minutes=30))  # expires 30 minutes from NOW
        _link(s, closed, 0, early, findings=4)
        _link(s, closed, 1, late, findings=3)
        still_open = _audit_run(s, "running")  # a run still scanning keeps its jobs, expired or not
        scanned = _job(s, key=key, audit_run=still_open)
        _link(s, still_open, 0, scanned, findings=1)

    report = retention.purge_expired(db, _settings(), now=NOW)
    assert not any(report.as_dict().values())  # one job of `closed` has not expired: the run stays whole
    assert _left(db, AuditFinding, AuditFinding.run_id) == {closed, still_open}

    report = retention.purge_expired(db, _settings(), now=NOW + timedelta(hours=1))
    assert report.as_dict() == {"jobs": 2, "results": 8, "audit_runs": 1, "findings": 7, "engine_runs": 0}
    assert _left(db, AuditRun, AuditRun.id) == {still_open}
    assert _left(db, AuditRunJob, AuditRunJob.run_id) == {still_open}
    assert _left(db, AuditFinding, AuditFinding.run_id) == {still_open}
    assert _left(db, Job, Job.id) == {scanned}
    assert not any(retention.purge_expired(db, _settings(), now=NOW + timedelta(hours=1)).as_dict().values())


def test_count_expired_says_what_a_purge_would_delete(db):
    with db() as s, s.begin():
        key = _key(s, "k", 60)
        _job(s, key=key)
        _job(s, key=key, state="running")
        run = _audit_run(s, "failed")
        _link(s, run, 0, _job(s, key=key, audit_run=run), findings=1)
    with db() as s:
        assert retention.count_expired(s, _settings(), now=NOW) == {"jobs": 2, "audit_runs": 1}
    assert retention.purge_expired(db, _settings(), now=NOW).jobs == 2


@pytest.mark.postgres
def test_two_purges_at_once_delete_each_row_once(postgres_url):
    from selfie_jobs.migrate import upgrade

    upgrade(postgres_url)
    db = get_sessionmaker(postgres_url)
    with db() as s, s.begin():
        key = _key(s, "k", 60)
        jobs = [_job(s, key=key, rows=6) for _ in range(6)]
    reports, errors = [], []

    def purge():
        try:
            reports.append(retention.purge_expired(db, _settings(), now=NOW))
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=purge) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sum(r.jobs for r in reports) == len(jobs) and sum(r.results for r in reports) == 6 * len(jobs)
    assert _counts(db)["jobs"] == 0 and _counts(db)["chunks"] == 0


def test_purging_an_edit_job_deletes_its_variant_row_and_files(db, tmp_path):
    from selfie_jobs.models import Variant
    from tests.unit.jobs.factories import make_variant

    root = tmp_path / "variant-store"
    with db() as s:
        old = make_variant(s, root, b"old weights", created_at=NOW - 3 * DAY)
        kept = make_variant(s, root, b"kept weights", created_at=NOW - 3 * DAY)
        s.get(Job, kept.job_id).ttl_seconds = 10 * 24 * 3600
        old_job, old_file, kept_file = old.job_id, root / old.path, root / kept.path
        s.commit()
    assert old_file.is_file() and kept_file.is_file()
    retention.purge_expired(db, _settings(job_ttl_seconds=3600, variant_store_dir=root), now=NOW)
    with db() as s:
        assert s.get(Job, old_job) is None
        assert [v.job_id for v in s.scalars(select(Variant))] == [kept.job_id]
    assert not old_file.exists() and not old_file.parent.exists()
    assert kept_file.is_file()
