"""10,000 prompts: the fan-out makes chunked jobs with bounded memory, and a job's scan reads in pages."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from sqlalchemy import func, select

from selfie_jobs import audit_detectors as D
from selfie_jobs import audits as A
from selfie_jobs.audit_models import AuditRunJob
from selfie_jobs.models import Chunk, Job
from selfie_jobs.prompt_sets import create_prompt_set
from tests.unit.jobs.audits.support import RecordingSender, run_all_chunks, setup_db

pytestmark = pytest.mark.slow

WORDS = "the cat sat on the mat a dog ran to park paris capital of france eiffel tower".split()
N = 10_000


def test_ten_thousand_prompt_audit_fans_out_with_bounded_memory(tmp_path, sqlite_url):
    settings, maker = setup_db(sqlite_url, max_prompts_per_job=1_000, max_interpretations_per_job=20_000,
                               chunk_size=64)
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as fh:
        for i in range(N):
            fh.write(json.dumps({"prompt": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + i % 9))}) + "\n")
    with maker() as session, open(path, "rb") as fh:
        ps = create_prompt_set(session, "ten-thousand", fh, "jsonl")
        audit = A.create_audit(session, A.AuditCreate(
            name="scale", model="tiny", prompt_set=ps.name, targets={"layers": [1, 2, 3, 4], "tokens": {"last": 1}},
            detectors=[{"kind": "keywords", "words": ["cat"]}]), settings)
        run, _ = A.start_run(session, audit)
        session.commit()
        run_id = run.id

    sender = RecordingSender()
    tracemalloc.start()
    started = time.perf_counter()
    run = A.fan_out(maker, run_id, settings, sender, owner="w1")
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert run.state == "running" and run.prompts_submitted == N and run.jobs_total == 10
    with maker() as session:
        assert session.scalar(select(func.sum(Job.total)).where(Job.audit_run_id == run_id)) == 4 * N
        n_chunks = session.scalar(select(func.count()).select_from(Chunk))
        assert n_chunks == 10 * -(-4_000 // 64) and len(sender.sent) == n_chunks
        offsets = session.scalars(select(AuditRunJob.prompt_offset).order_by(AuditRunJob.batch)).all()
        assert offsets == list(range(0, N, 1_000))
    # one job (1,000 prompts, 4,000 interpretations) is in memory at a time, not the 10,000 prompts
    assert peak < 60_000_000, f"fan-out peak {peak / 1e6:.1f} MB"
    print(f"fan-out of {N} prompts: {elapsed:.1f}s, peak {peak / 1e6:.1f} MB of Python allocations")

    # scanning one job of 4,000 interpretations reads them in pages
    with maker() as session:
        first_job = session.scalars(select(AuditRunJob.job_id).order_by(AuditRunJob.batch)).first()
    run_all_chunks(maker, lambda j, p, layer, t: ("a cat " * 20, 0.5), job_ids=[first_job])
    built = D.build_all([{"kind": "keywords", "words": ["cat"]}])
    with maker() as session:
        rj = session.scalars(select(AuditRunJob.id).where(AuditRunJob.job_id == first_job)).one()
        tracemalloc.start()
        flags = A.scan_job(session, rj, lambda text, rel: D.detect(built, text, rel), page=500)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        session.commit()
    assert flags == 4_000
    assert peak < 30_000_000, f"scan peak {peak / 1e6:.1f} MB"
