"""The real `selfie` CLI (a subprocess) for retention: a key's time to live (`keys create --job-ttl`, `keys ttl`),
and `selfie purge` (with `--dry-run`) on a database with an expired job, a job kept for ever and a running one."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from selfie_jobs.db import session_scope
from selfie_jobs.migrate import upgrade
from selfie_jobs.models import ApiKey, Interpretation, Job, utcnow
from tests.integration.test_cli_errors import assert_user_error, selfie
from tests.unit.jobs.factories import make_job


def test_key_time_to_live_and_purge_from_the_command_line(database_url):
    upgrade(database_url)
    env = {"SELFIE_DATABASE_URL": database_url}
    made = selfie("keys", "create", "short-lived", "--job-ttl", "12h", **env)
    assert made.returncode == 0, made.stderr
    assert "job-ttl=12h" in selfie("keys", "list", **env).stdout
    assert selfie("keys", "ttl", "1", "1h", **env).stdout.startswith("key 1: its jobs are kept 1h after they finish")
    assert_user_error(selfie("keys", "ttl", "1", "0", **env), 2, "a time to live is 1 s")
    assert_user_error(selfie("keys", "ttl", "1", "3 weeks", **env), 2, "not a duration")
    assert_user_error(selfie("keys", "ttl", "1", "-1", **env), 2, "not a duration")  # not an unknown option
    assert_user_error(selfie("keys", "ttl", "1", "\u0661\u0662", **env), 2, "not a duration")  # Arabic-Indic 12
    assert_user_error(selfie("keys", "ttl", "1", "\uff11\uff12h", **env), 2, "not a duration")  # full-width 12
    assert_user_error(selfie("keys", "ttl", "99", "1d", **env), 1, "no key '99'")
    with session_scope(database_url) as s:
        assert s.get(ApiKey, 1).job_ttl_seconds == 3600
        jobs = {}
        for name, key, state in (("expired", 1, "succeeded"), ("keyless", None, "succeeded"), ("running", 1, "running")):
            job = make_job(s, created_at=utcnow() - timedelta(days=3))
            job.owner_key_id, job.state = key, state
            job.finished_at = utcnow() - timedelta(hours=2) if state == "succeeded" else None
            s.flush()
            s.add(Interpretation(job_id=job.id, prompt_index=0, layer=0, token=0, source_token="t", text="x",
                                 token_ids=[1], relevancy=[0.5], mean_relevancy=0.5, chunk_id=_chunk(s, job.id),
                                 engine_run_id="r", worker="w", model="tiny"))
            jobs[name] = job.id

    dry = selfie("purge", "--dry-run", **env)
    assert dry.returncode == 0 and dry.stdout.startswith("expired: 1 job(s), 0 audit run(s)"), dry.stdout + dry.stderr
    assert _job_ids(database_url) == set(jobs.values())
    done = selfie("purge", **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("purged 1 job(s) with 1 result row(s)"), done.stdout
    assert _job_ids(database_url) == {jobs["keyless"], jobs["running"]}
    # the service's default applies to the keyless job; a running job stays whatever its key says
    again = selfie("purge", **env, SELFIE_JOB_TTL_SECONDS="60")
    assert again.stdout.startswith("purged 1 job(s)") and _job_ids(database_url) == {jobs["running"]}


def _chunk(session, job_id):
    from selfie_jobs.models import Chunk

    return session.scalar(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.index))


def _job_ids(url) -> set[str]:
    with session_scope(url) as s:
        return set(s.scalars(select(Job.id)))
