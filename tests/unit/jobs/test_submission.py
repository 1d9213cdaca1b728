"""Submission against a model card (SQLite file, a real tokenizer; the queue is a recording stand-in here,
the integration tests use real Redis)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from selfie_jobs.auth import authenticate, create_key, list_keys, revoke_key
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.models import Chunk, Job, Prompt
from selfie_jobs.specs import JobCreate
from selfie_jobs.submission import SubmissionError, chunk_bounds, prepare_job, submit_job
from tests.apisupport import MAX_CONTEXT, MODEL, NUM_LAYERS, prepare_database, settings_for


class Recorder:
    def __init__(self, fail_after: int | None = None):
        self.sent: list[tuple[str, list, dict]] = []
        self.fail_after = fail_after

    def send_task(self, name, args=None, **options):
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionError("broker down")
        self.sent.append((name, args, options))


@pytest.fixture
def db(sqlite_url):
    prepare_database(sqlite_url)
    return get_sessionmaker(sqlite_url), settings_for(sqlite_url, "redis://unused")


def _req(**kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("prompts", ["the eiffel tower is in paris"])
    return JobCreate.model_validate(kw)


def test_grid_expansion_with_negative_tokens_and_ranges(db):
    maker, settings = db
    with maker() as s:
        prepared = prepare_job(s, _req(prompts=["a cat", "the dog ran to the park"],
                                       targets={"layers": {"start": 0, "step": 2}, "tokens": [-1, 0]}), settings)
    # layers 0, 2, 4 (depth 4 -> hidden_states 0..4); prompt 0 has 3 tokens (BOS + 2), prompt 1 has 7
    assert prepared.items[:6] == [[0, 0, 2], [0, 0, 0], [0, 2, 2], [0, 2, 0], [0, 4, 2], [0, 4, 0]]
    assert [0, 0, 0] in prepared.items and [1, 4, 6] in prepared.items and len(prepared.items) == 12
    assert prepared.prompts[0] == ("a cat", ["<s>", "a", "cat"])
    assert prepared.spec["template"] == {"preset": "summarize", "system": None}  # no system prompt by default


def test_pairs_are_resolved_per_prompt_and_deduplicated(db):
    maker, settings = db
    with maker() as s:
        prepared = prepare_job(s, _req(prompts=["a cat", "a cat sat"], targets={"pairs": [[1, -1], [1, 2], [0, 0]]}),
                               settings)
    assert prepared.items == [[0, 1, 2], [0, 0, 0], [1, 1, 3], [1, 1, 2], [1, 0, 0]]


@pytest.mark.parametrize(
    "kw, field, status",
    [
        ({"model": "nope"}, "model", 422),
        ({"k": NUM_LAYERS}, "k", 422),
        ({"targets": {"layers": [NUM_LAYERS + 1]}}, "targets.layers", 422),
        ({"targets": {"tokens": [99]}}, "targets.tokens", 422),
        ({"targets": {"pairs": [[0, -99]]}}, "targets.pairs", 422),
        ({"targets": {"layers": {"start": 3, "stop": 1}}}, "targets.layers", 422),
        ({"template": "no-such-preset"}, "template.preset", 422),
        ({"template": {"parts": ["the", 0]}}, "template.parts", 422),
        ({"max_new_tokens": 33}, "max_new_tokens", 422),
        ({"prompts": ["x"] * 21}, "prompts", 422),
        ({"prompts": ["x" * 401]}, "prompts", 422),
        ({"prompts": [" ".join(["cat"] * MAX_CONTEXT)]}, "prompts", 422),
        ({"prompts": ["a cat sat on the mat"] * 20}, "targets", 413),
    ],
)
def test_card_errors(db, kw, field, status):
    maker, settings = db
    with maker() as s, pytest.raises(SubmissionError) as info:
        prepare_job(s, _req(**kw), settings)
    assert info.value.field == field and info.value.status == status, info.value.message


def test_template_parts_and_context(db):
    maker, settings = db
    with maker() as s:
        ok = prepare_job(s, _req(template={"parts": ["what", 0, 0, "meaning"]}, max_new_tokens=10), settings)
        assert ok.spec["template"] == {"parts": ["what", 0, 0, "meaning"]}
        with pytest.raises(SubmissionError, match="exceed the context"):
            prepare_job(s, _req(template={"parts": ["what " * 30, 0, "meaning"]}, max_new_tokens=30), settings)


def test_a_sliding_window_card_refuses_what_the_engine_would(db):
    from selfie_jobs.models import ServedModel

    maker, settings = db
    parts = {"template": {"parts": ["what", 0, 0, "meaning"]}}
    with maker() as s:
        prepare_job(s, _req(**parts, max_new_tokens=12), settings)  # no window: fits the context
        card = s.get(ServedModel, MODEL)
        card.card = {**card.card, "sliding_window": 12}
        s.commit()
        prepare_job(s, _req(**parts, max_new_tokens=1), settings)
        with pytest.raises(SubmissionError, match=r"exceed the sliding attention window of .* \(12 tokens\)") as info:
            prepare_job(s, _req(**parts, max_new_tokens=12), settings)
        assert info.value.field == "max_new_tokens"


def test_submit_stores_one_transaction_then_enqueues(db):
    maker, settings = db
    sender = Recorder()
    with maker() as s:
        result = submit_job(s, _req(targets={"layers": "all", "tokens": "all"}), settings, sender)
    assert result.created and result.enqueued == len(result.chunk_ids) == 5  # 5 layers x 7 tokens = 35, chunks of at most 8
    with maker() as s:
        job = s.get(Job, result.job.id)
        chunks = s.scalars(select(Chunk).where(Chunk.job_id == job.id).order_by(Chunk.index)).all()
        assert job.total == 35 and [c.size for c in chunks] == [7, 7, 7, 7, 7]
        assert all(c.enqueued_at is not None and c.state == "queued" for c in chunks)
        assert sum((c.items for c in chunks), []) == [[0, layer, t] for layer in range(5) for t in range(7)]
        assert s.scalar(select(func.count()).select_from(Prompt)) == 1
    assert [args for _, args, _ in sender.sent] == [[c] for c in result.chunk_ids]
    assert {opts["queue"] for _, _, opts in sender.sent} == {"selfie.model." + MODEL}


@pytest.mark.parametrize("items", [0, 1, 7, 8, 9, 35, 100, 257, 1000])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_chunks_are_as_few_as_the_size_allows_and_even(items, chunk_size):
    bounds = chunk_bounds(items, chunk_size)
    sizes = [end - start for start, end in bounds]
    assert [b for pair in bounds for b in pair] == sorted(b for pair in bounds for b in pair)  # in order
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and (not bounds or bounds[0][0] == 0)
    assert sum(sizes) == items and len(bounds) == -(-items // chunk_size)
    assert all(1 <= n <= chunk_size for n in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)


def test_broker_failure_keeps_the_job_for_the_reconciler(db):
    maker, settings = db
    with maker() as s:
        result = submit_job(s, _req(), settings, Recorder(fail_after=2))
    assert result.created and result.enqueued == 2
    with maker() as s:
        stamped = s.scalars(select(Chunk.enqueued_at).where(Chunk.job_id == result.job.id).order_by(Chunk.index)).all()
    assert [t is not None for t in stamped] == [True, True, False, False, False]


def test_idempotency_key_returns_the_first_job(db):
    maker, settings = db
    sender = Recorder()
    with maker() as s:
        first = submit_job(s, _req(idempotency_key="k1"), settings, sender, owner_key_id=None)
        again = submit_job(s, _req(idempotency_key="k1"), settings, sender, owner_key_id=None)
        other = submit_job(s, _req(idempotency_key="k2"), settings, sender)
    assert again.job.id == first.job.id and not again.created and again.enqueued == 0
    assert other.job.id != first.job.id
    assert len(sender.sent) == first.enqueued + other.enqueued


def test_idempotency_key_with_another_request_is_refused(db):
    maker, settings = db
    sender = Recorder()
    with maker() as s:
        first = submit_job(s, _req(idempotency_key="k1"), settings, sender)
        with pytest.raises(SubmissionError) as info:
            submit_job(s, _req(idempotency_key="k1", prompts=["other"]), settings, sender)
        with pytest.raises(SubmissionError):
            submit_job(s, _req(idempotency_key="k1", max_new_tokens=3), settings, sender)
        # the same request spelled otherwise (one prompt as a string, decoding defaults written out) is the same
        same = submit_job(s, _req(idempotency_key="k1", prompts="the eiffel tower is in paris",
                                  decoding={"do_sample": False, "top_p": 1.0}), settings, sender)
        n_jobs = s.scalar(select(func.count()).select_from(Job))
    assert info.value.status == 409 and info.value.field == "idempotency_key"
    assert "different request" in info.value.message and first.job.id in info.value.message
    assert same.job.id == first.job.id and not same.created
    assert n_jobs == 1 and len(sender.sent) == first.enqueued


def test_daily_quota(db):
    maker, settings = db
    with maker() as s:
        key, _ = create_key(s, "small", daily_quota=40)
        s.commit()
        submit_job(s, _req(), settings, Recorder(), owner_key_id=key.id)  # 35
        with pytest.raises(SubmissionError) as info:
            submit_job(s, _req(), settings, Recorder(), owner_key_id=key.id)
    assert info.value.status == 429 and info.value.retry_after


def test_api_keys_hashed_found_by_prefix_and_revocable(db):
    maker, _ = db
    with maker() as s:
        row, secret = create_key(s, "alice")
        admin, admin_secret = create_key(s, "root", admin=True)
        s.commit()
        assert secret not in (row.key_hash, row.prefix) and secret.startswith(row.prefix)
        assert authenticate(s, secret).id == row.id
        assert authenticate(s, admin_secret).is_admin
        assert authenticate(s, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert authenticate(s, "garbage") is None
        assert revoke_key(s, row.prefix).revoked_at is not None
        s.commit()
        assert authenticate(s, secret) is None
        assert [k.name for k in list_keys(s)] == ["root"]
        assert revoke_key(s, str(admin.id)).revoked_at is not None


def test_a_retry_the_quota_refuses_gets_the_job_its_first_try_stored(db):
    """A client retries a submit (same idempotency key) while the first try is still storing its job, near its
    key's quota: under the key's lock the retry counts the first job in the quota, and that job is its answer."""
    from sqlalchemy.orm import Session

    from selfie_jobs.db import create_db_engine
    from selfie_jobs.models import ApiKey
    from selfie_jobs.submission import check_quota, idempotency_scope, request_hash, store_job
    from tests.locksupport import LockStep

    maker, settings = db
    request = _req(idempotency_key="retry")
    with maker() as s:
        size = len(prepare_job(s, request, settings).items)
        key, _ = create_key(s, "k", daily_quota=size)  # room for one job, not two
        s.commit()
        key_id = key.id
    other = create_db_engine(settings.database_url)

    def retry():
        with Session(other) as s:
            return submit_job(s, request, settings, Recorder(), owner_key_id=key_id)

    try:
        with maker() as first:  # the first try, between its quota check and its commit
            prepared = prepare_job(first, request, settings)
            check_quota(first, key_id, size, settings)
            job, _ = store_job(first, prepared, request, key_id, settings, idempotency_scope(key_id, "retry"),
                               request_hash(request, MODEL))
            first.flush()
            second = LockStep(other, retry).start()
            first.commit()
            first_id = job.id
        result = second.join()
    finally:
        other.dispose()
    assert result.job.id == first_id and not result.created
    with maker() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        assert s.get(ApiKey, key_id).daily_quota == size
