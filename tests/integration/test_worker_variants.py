"""Jobs on model variants through a real worker process (Celery prefork, the tiny LLaMA from a Hugging Face folder),
real Redis, SQLite and PostgreSQL. The variant is made here as an edit job leaves it: a finished `supervised` job,
its chunk, the variant's row and the edited MLP saved by `workers.variants.save_edit` into the artifact store the
worker shares.

Proves: each engine kind's rows on a variant differ from the model's own; the model's own rows after the worker
served a variant are bit-identical to those before; a variant whose file is missing or corrupted, or that was
deleted while its job was queued, fails the job with that reason and stores no row.
"""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from selfie_core.weights import MLPEdit
from selfie_jobs.models import Job
from selfie_jobs.variants import delete_variant
from tests.integration.test_worker import JOB_TIMEOUT, private_redis_url, stack, tiny_model_dir  # noqa: F401
from tests.unit.jobs.factories import make_variant

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KINDS = ("interpret", "vectors", "lenses", "generate")


def _edit(model_dir):
    """The tiny model's block-0 MLP, tripled: below the injection layer (k=1), so every kind's rows change."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    edit = MLPEdit(model, 0)
    with torch.no_grad():
        for p in edit.module.parameters():
            p.mul_(3.0)
    return edit


def _variant(stack, edit) -> tuple[str, object]:
    with stack.db() as s:
        variant = make_variant(s, stack.artifacts, edit=edit, model="tiny")
        s.commit()
        return variant.id, stack.artifacts / variant.path


def _rows(stack, job_id: str) -> list[dict]:
    """The job's rows in item order, every stored column but ids, times and provenance."""
    with stack.db() as s:
        job = s.get(Job, job_id)
        from selfie_jobs.kinds import get_kind

        kind = get_kind(job.kind)
        rows = s.scalars(select(kind.table).where(kind.table.job_id == job_id)).all()
        skip = {"id", "job_id", "chunk_id", "engine_run_id", "worker", "created_at", "search_vector"}
        out = [{c.key: getattr(r, c.key) for c in kind.table.__table__.columns if c.key not in skip} for r in rows]
    return sorted(out, key=lambda r: tuple(r[c] for c in kind.item_columns))


def _baseline(stack, job_id: str):
    with stack.db() as s:
        return s.get(Job, job_id).baseline


@pytest.fixture
def served(stack, tiny_model_dir):  # noqa: F811 - fixtures
    stack.artifacts = stack.tmp / "variant-store"
    stack.settings = stack.settings.model_copy(update={"variant_store_dir": stack.artifacts})
    worker = stack.start_worker("w1", SELFIE_VARIANT_STORE_DIR=str(stack.artifacts))
    stack.wait_ready(worker)
    return stack


def test_jobs_on_a_variant_differ_and_the_base_models_rows_stay_bit_identical(served, tiny_model_dir):  # noqa: F811
    stack = served
    vid, _ = _variant(stack, _edit(tiny_model_dir))
    requests = {kind: stack.kind_request(kind) for kind in KINDS}
    before = {kind: stack.submit(request) for kind, request in requests.items()}
    stack.wait_jobs(*before.values())
    on_variant = {kind: stack.submit(request.model_copy(update={"variant": vid}))
                  for kind, request in requests.items()}
    stack.wait_jobs(*on_variant.values())
    after = {kind: stack.submit(request) for kind, request in requests.items()}
    stack.wait_jobs(*after.values(), timeout=JOB_TIMEOUT)
    for kind in KINDS:
        for job in (before[kind], on_variant[kind], after[kind]):
            stack.assert_exactly_once(job)
        base, variant, again = _rows(stack, before[kind]), _rows(stack, on_variant[kind]), _rows(stack, after[kind])
        assert variant != base, kind
        assert again == base, kind  # every stored column, the float relevancies and probabilities bit for bit
    with stack.db() as s:
        assert s.get(Job, on_variant["interpret"]).spec["variant"] == vid
    # the baseline (the interpretation prompt's own output) of a variant's job is its own, not the base model's
    assert _baseline(stack, after["interpret"]) == _baseline(stack, before["interpret"])
    assert _baseline(stack, on_variant["interpret"]) != _baseline(stack, before["interpret"])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_variant_that_cannot_be_served_fails_its_jobs_with_the_reason(served, tiny_model_dir):  # noqa: F811
    stack = served
    edit = _edit(tiny_model_dir)
    missing, missing_path = _variant(stack, edit)
    corrupted, corrupted_path = _variant(stack, edit)
    deleted, _ = _variant(stack, edit)
    missing_path.unlink()
    data = bytearray(corrupted_path.read_bytes())
    data[-1] ^= 1
    corrupted_path.write_bytes(bytes(data))
    # queued while the variant existed, then the variant is deleted (its row, then its files)
    queued, _ = stack.store_only(stack.request(variant=deleted))
    with stack.db() as s:
        from selfie_jobs.models import Variant

        delete_variant(s, s.get(Variant, deleted), stack.artifacts)
        s.commit()
    jobs = {"missing": stack.submit(stack.request(variant=missing)),
            "corrupted": stack.submit(stack.request(variant=corrupted))}
    stack.enqueue(queued)
    jobs["deleted"] = queued
    stack.wait_jobs(*jobs.values())
    reasons = {"missing": "weights file is missing from the artifact store",
               "corrupted": "weights file is corrupted: its sha256 is",
               "deleted": "no longer exists (it was deleted)"}
    with stack.db() as s:
        for name, job_id in jobs.items():
            job = s.get(Job, job_id)
            variant = {"missing": missing, "corrupted": corrupted, "deleted": deleted}[name]
            assert job.state == "failed", (name, job.state, job.error)
            assert job.error.startswith(f"variant {variant} cannot be served: ") and reasons[name] in job.error, \
                (name, job.error)
            assert job.baseline is None
    assert all(stack.rows(j) == 0 for j in jobs.values())
    # the worker still serves the model's own weights
    ok = stack.submit(stack.request())
    stack.wait_jobs(ok)
    stack.assert_exactly_once(ok)
