"""Accept a job: validate it against the model card (no torch), expand its targets, store it, then enqueue it.

The model card (`served_models`) is written by the workers when they load a model: depth, context length, template
presets and the tokenizer as `tokenizer.json` text, which the `tokenizers` package reads. So every check the engine
would make about layers, tokens, k and lengths is made here, before anything is stored or enqueued.

Storage is one transaction (job + prompts + chunks); enqueueing happens only after the commit, so a worker never
receives an id it cannot read. A chunk whose message could not be sent keeps `enqueued_at` empty and is re-sent by
the reconciler: the database, not Redis, is the source of truth.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from tokenizers import Tokenizer

from selfie_jobs.cards import card_presets, card_tokenizer, default_preset, load_card
from selfie_jobs.errors import SubmissionError
from selfie_jobs.kinds import DEFAULT_KIND, PreparedJob, get_kind, kind_of_request
from selfie_jobs.locking import lock_row
from selfie_jobs.models import ApiKey, Chunk, Job, ServedModel, utcnow
from selfie_jobs.queue import TaskSender, send_chunk
from selfie_jobs.settings import Settings
from selfie_jobs.specs import (
    EngineJobFields,
    IndexRange,
    JobCreate,
    Targets,
    engine_spec,
    request_hash,
    resolve_index,
    resolve_selector,
    spec_batch_key,
)
from selfie_jobs.states import ChunkState, JobState
from selfie_jobs.variants import check_usable

log = logging.getLogger(__name__)

#: The daily quota counts the items of a key's jobs submitted within this window, so no job younger than it is ever
#: purged (selfie_jobs.retention): deleting it would give its items back to the quota.
QUOTA_WINDOW = timedelta(days=1)

#: Text that stands for one placeholder when the template is rendered (as in the engine).
PLACEHOLDER_TEXT = "_ "


@dataclass
class SubmitResult:
    job: Job
    created: bool
    chunk_ids: list[int] = field(default_factory=list)
    enqueued: int = 0


# --- validation and expansion ---------------------------------------------------------------------------------------


def _template_length(tokenizer: Tokenizer, parts: Sequence[str | int]) -> int:
    """Tokens of the rendered interpretation prompt; raises if the placeholders map to no tokens (engine rule)."""
    text = ""
    positions: list[int] = []
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        start = len(tokenizer.encode(text).ids)
        text += PLACEHOLDER_TEXT
        positions.extend(range(start, len(tokenizer.encode(text).ids)))
    ids = tokenizer.encode(text).ids
    if not positions:
        raise SubmissionError("the template's placeholders map to no tokens", field="template.parts")
    if max(positions) >= len(ids):
        raise SubmissionError(
            "the template's placeholders fall outside its tokenized text; put some text after the last placeholder",
            field="template.parts",
        )
    return len(ids)


def _check_template(request: EngineJobFields, card: ServedModel, tokenizer: Tokenizer) -> tuple[dict[str, Any], int | None]:
    """The normalized template spec and its token length when it can be known here."""
    template = request.template
    if template is None or template.parts is None:
        name = template.preset if template is not None and template.preset is not None else default_preset(card)
        presets = card_presets(card)
        if presets is not None and name not in presets:
            raise SubmissionError(
                f"unknown template preset {name!r} for model {card.name!r}; known: {', '.join(sorted(presets))}",
                field="template.preset",
            )
        facts = (presets or {}).get(name, {})
        system = template.system if template is not None else None
        if system is not None and facts.get("takes_system") is False:
            raise SubmissionError(f"the chat template of model {card.name!r} takes no system prompt",
                                  field="template.system")
        length = facts.get("num_tokens")
        if isinstance(length, int) and system is not None:
            length += len(tokenizer.encode(system, add_special_tokens=False).ids)  # at least; the engine checks all
        # "system" is always written: a preset spec without it was stored when presets kept the chat template's
        # own default system prompt, and renders so (workers.runners.interpret)
        return {"preset": name, "system": system}, (int(length) if isinstance(length, int) else None)
    parts = [p if isinstance(p, str) else 0 for p in template.parts or []]
    return {"parts": parts}, _template_length(tokenizer, parts)


def _resolve(selector: Any, length: int, what: str, field_name: str) -> list[int]:
    try:
        return list(dict.fromkeys(resolve_selector(selector, length, what)))
    except ValueError as exc:
        raise SubmissionError(str(exc), field=field_name) from None


def _count_and_expand(targets: Targets, depth: int, token_counts: list[int], cap: int) -> list[list[int]]:
    """[prompt_index, layer, token] items, without duplicates; the cap is checked before anything is built."""
    n_layers = depth + 1  # hidden_states indices 0..depth
    if targets.pairs is not None:
        if len(targets.pairs) * len(token_counts) > cap:
            raise _too_many(len(targets.pairs) * len(token_counts), cap)
        items: dict[tuple[int, int, int], None] = {}
        for p, n_tokens in enumerate(token_counts):
            for layer, token in targets.pairs:
                try:
                    lay = resolve_index(layer, n_layers, "layer")
                    tok = resolve_index(token, n_tokens, f"token (prompt {p} has {n_tokens} tokens)")
                except ValueError as exc:
                    raise SubmissionError(str(exc), field="targets.pairs") from None
                items[(p, lay, tok)] = None
        return [list(item) for item in items]

    layers = _resolve(targets.layers, n_layers, "layer", "targets.layers")
    if not layers:
        raise SubmissionError("the layer selection is empty", field="targets.layers")
    per_prompt: list[list[int]] = []
    total = 0
    for p, n_tokens in enumerate(token_counts):
        tokens = _resolve(targets.tokens, n_tokens, f"token (prompt {p} has {n_tokens} tokens)", "targets.tokens")
        if not tokens:
            raise SubmissionError(f"the token selection is empty for prompt {p}", field="targets.tokens")
        per_prompt.append(tokens)
        total += len(tokens) * len(layers)
        if total > cap:
            raise _too_many(total, cap)
    return [[p, layer, tok] for p, tokens in enumerate(per_prompt) for layer in layers for tok in tokens]


def _too_many(count: int, cap: int) -> SubmissionError:
    return SubmissionError(
        f"the job asks for {count} interpretations; at most {cap} per job (split it into several jobs)",
        field="targets",
        status=413,
    )


def check_engine_fields(session: Session, request: EngineJobFields, model: str,
                        settings: Settings) -> tuple[ServedModel, dict[str, Any], int | None]:
    """The checks every kind shares, against the model card: max_new_tokens, k, the template and the context.
    Returns the card, the normalized template spec and the template's token length (when known)."""
    if request.max_new_tokens > settings.max_new_tokens_cap:
        raise SubmissionError(
            f"max_new_tokens={request.max_new_tokens}; at most {settings.max_new_tokens_cap}", field="max_new_tokens"
        )
    card = load_card(session, model, settings.worker_alive_seconds)
    if request.k >= card.num_layers:
        raise SubmissionError(
            f"k={request.k} is out of range: the injection layer must be in 0..{card.num_layers - 1} for {model!r}",
            field="k",
        )
    template, template_len = _check_template(request, card, card_tokenizer(card))
    if template_len is not None and template_len + request.max_new_tokens > card.max_context:
        raise SubmissionError(
            f"template ({template_len} tokens) + max_new_tokens ({request.max_new_tokens}) exceed the context "
            f"of {model!r} ({card.max_context} tokens)",
            field="max_new_tokens",
        )
    window = (card.card or {}).get("sliding_window")  # as the engine's check_generation
    if template_len is not None and isinstance(window, int) and template_len + request.max_new_tokens > window:
        raise SubmissionError(
            f"template ({template_len} tokens) + max_new_tokens ({request.max_new_tokens}) exceed the sliding "
            f"attention window of {model!r} ({window} tokens): use a shorter template or fewer new tokens",
            field="max_new_tokens",
        )
    return card, template, template_len


def prepare_job(session: Session, request: JobCreate, settings: Settings) -> PreparedJob:
    """Everything the engine would reject, rejected here, with no write (the `interpret` kind's planner)."""
    model = request.model or settings.default_model
    if len(request.prompts) > settings.max_prompts_per_job:
        raise SubmissionError(
            f"{len(request.prompts)} prompts; at most {settings.max_prompts_per_job} per job", field="prompts"
        )
    for i, prompt in enumerate(request.prompts):
        if len(prompt) > settings.max_prompt_chars:
            raise SubmissionError(
                f"prompt {i} has {len(prompt)} characters; at most {settings.max_prompt_chars}", field="prompts"
            )
    card, template, _ = check_engine_fields(session, request, model, settings)
    depth, context = card.num_layers, card.max_context
    tokenizer = card_tokenizer(card)
    encodings = tokenizer.encode_batch(list(request.prompts))
    prompts: list[tuple[str, list[str]]] = []
    for i, (text, enc) in enumerate(zip(request.prompts, encodings, strict=True)):
        ids = enc.ids
        if not ids:
            raise SubmissionError(f"prompt {i} has no tokens", field="prompts")
        if len(ids) > context:
            raise SubmissionError(
                f"prompt {i} has {len(ids)} tokens; {model!r} takes at most {context}", field="prompts"
            )
        tokens = tokenizer.decode_batch([[t] for t in ids], skip_special_tokens=False)
        prompts.append((text, tokens))

    targets = Targets(layers="all", tokens="all") if request.targets == "all" else request.targets
    items = _count_and_expand(
        targets, depth, [len(t) for _, t in prompts], settings.max_interpretations_per_job
    )
    spec = engine_spec(request, template)
    return PreparedJob(model=model, spec=spec, batch_key=spec_batch_key(spec), prompts=prompts, items=items)


# --- storage and enqueueing -----------------------------------------------------------------------------------------


def idempotency_scope(owner_key_id: int | None, key: str) -> str:
    return f"{owner_key_id if owner_key_id is not None else 'local'}:{key}"


def check_quota(session: Session, owner_key_id: int | None, count: int, settings: Settings) -> None:
    """Interpretations per key over the last 24 hours. Holds the key's row until the caller's transaction ends, so
    concurrent submits of one key are checked one after the other, each counting the jobs stored before it."""
    if owner_key_id is None:
        return
    lock_row(session, ApiKey, owner_key_id)
    key = session.get(ApiKey, owner_key_id)
    quota = (key.daily_quota if key is not None and key.daily_quota is not None else settings.default_daily_quota)
    since = utcnow() - QUOTA_WINDOW
    used = session.scalar(
        select(func.coalesce(func.sum(Job.total), 0)).where(Job.owner_key_id == owner_key_id, Job.created_at >= since)
    )
    if int(used or 0) + count > quota:
        raise SubmissionError(
            f"daily quota exceeded: {int(used or 0)} of {quota} interpretations used in the last 24 h, "
            f"this job asks for {count}",
            status=429,
            retry_after=3600,
        )


def store_job(session: Session, prepared: PreparedJob, request: EngineJobFields, owner_key_id: int | None,
              settings: Settings, scope: str | None, digest: str | None = None) -> tuple[Job, list[Chunk]]:
    """Add job + the kind's inputs (prompts, vectors) + chunks to the session (the caller commits: one
    transaction)."""
    job = Job(
        owner_key_id=owner_key_id,
        model=prepared.model,
        kind=prepared.kind,
        state=JobState.QUEUED,
        priority=request.priority,
        idempotency_scope=scope,
        request_hash=digest,
        spec=prepared.spec,
        batch_key=prepared.batch_key,
        total=len(prepared.items),
        done=0,
        created_at=utcnow(),
        deadline_at=utcnow() + timedelta(seconds=settings.job_timeout_seconds),
        ttl_seconds=request.ttl_seconds,
    )
    session.add(job)
    session.flush()
    get_kind(prepared.kind).store_inputs(session, job.id, prepared)
    chunks = [
        Chunk(
            job_id=job.id,
            index=n,
            model=prepared.model,
            batch_key=prepared.batch_key,
            priority=request.priority,
            state=ChunkState.QUEUED,
            items=prepared.items[start:end],
            size=end - start,
        )
        for n, (start, end) in enumerate(chunk_bounds(len(prepared.items), settings.chunk_size))
    ]
    session.add_all(chunks)
    session.flush()
    return job, chunks


def chunk_bounds(items: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk: as few chunks as `chunk_size` allows, of sizes that differ by at most one.

    Even sizes pack into cross-job batches without remnants: 10 jobs of 100 items in chunks of 64 + 36 made the
    worker's engine runs 236 + 228 + ... + 36 (a last small batch decodes at the cost of a large one), in chunks of
    50 + 50 four runs of 250, as the engine itself batches 1,000 rows (benchmarks/README.md, vectors).
    """
    count = -(-items // chunk_size)
    bounds, start = [], 0
    for n in range(count):
        end = start + items // count + (1 if n < items % count else 0)
        bounds.append((start, end))
        start = end
    return bounds


def enqueue_chunks(session: Session, sender: TaskSender, chunks: Sequence[Chunk], model: str, priority: int,
                   kind: str | None = None) -> int:
    """Send one wake-up per chunk and stamp `enqueued_at` in a transaction of its own, after the job's: a failed send
    or stamp is left to the reconciler."""
    sent: list[int] = []
    try:
        for chunk in chunks:
            send_chunk(sender, chunk.id, model, priority, kind)
            sent.append(chunk.id)
    except Exception:  # noqa: BLE001 - any broker failure: the rows are stored, the reconciler re-sends
        log.exception("enqueueing failed after %d of %d chunks; the reconciler will re-send the rest",
                      len(sent), len(chunks))
    if sent:
        try:
            now = utcnow()
            for start in range(0, len(sent), 500):
                session.execute(
                    update(Chunk).where(Chunk.id.in_(sent[start : start + 500])).values(enqueued_at=now)
                )
            session.commit()
        except SQLAlchemyError:
            # The job is committed and its messages are out: it will run, and the client must hear so (202), not
            # 500. Unstamped chunks look unsent to the reconciler, which sends them again after the grace period;
            # a second message for a chunk is harmless (the claim is a compare-and-set).
            session.rollback()
            log.exception("stamping enqueued_at of %d sent chunks failed; the reconciler re-sends them", len(sent))
    return len(sent)


def _existing(session: Session, scope: str) -> Job | None:
    return session.scalars(select(Job).where(Job.idempotency_scope == scope)).first()


def _replay(job: Job, digest: str, key: str) -> SubmitResult:
    """The first job of an idempotency key, if this request is the same one; else a 409."""
    if job.request_hash is not None and job.request_hash != digest:
        raise SubmissionError(
            f"idempotency key {key!r} was already used for a different request (job {job.id}); "
            "send the same request to get that job again, or use a new key for a new job",
            field="idempotency_key",
            status=409,
        )
    return SubmitResult(job=job, created=False)


def submit_job(session: Session, request: EngineJobFields, settings: Settings, sender: TaskSender,
               owner_key_id: int | None = None, *, see_all: bool | None = None) -> SubmitResult:
    """Validate, store (one transaction), then enqueue, for a request of any job kind (`selfie_jobs.kinds`).
    A repeated idempotency key returns the first job when the request is the same (by the hash of its normalized
    form), and is refused with 409 when it differs. `see_all`: the caller may use every key's variants (an admin
    key; by default the keyless local mode only)."""
    kind = kind_of_request(request)
    scope = idempotency_scope(owner_key_id, request.idempotency_key) if request.idempotency_key else None
    digest = request_hash(request, request.model or settings.default_model,
                          kind=None if kind.name == DEFAULT_KIND else kind.name)
    if scope is not None and (job := _existing(session, scope)) is not None:
        return _replay(job, digest, request.idempotency_key or "")

    if request.variant is not None:
        check_usable(session, request.variant, request.model or settings.default_model, owner_key_id,
                     owner_key_id is None if see_all is None else see_all)
    prepared = kind.prepare(session, request, settings)
    if prepared.spec.get("variant") != request.variant:
        # a kind that dropped the variant would run the job on the model's own weights
        raise RuntimeError(f"the {kind.name} kind's spec does not carry the request's variant")
    try:
        cost = len(prepared.items) if prepared.quota_items is None else max(prepared.quota_items, len(prepared.items))
        check_quota(session, owner_key_id, cost, settings)
    except SubmissionError:
        # Checked under the key's lock: a submit with the same idempotency key that stored its job while this one
        # waited for it counts in the quota, and that job is the answer (a client's retry after a timeout).
        if scope is not None and (job := _existing(session, scope)) is not None:
            return _replay(job, digest, request.idempotency_key or "")
        raise
    try:
        job, chunks = store_job(session, prepared, request, owner_key_id, settings, scope, digest)
        session.commit()
    except IntegrityError:
        session.rollback()
        if scope is not None and (job := _existing(session, scope)) is not None:
            return _replay(job, digest, request.idempotency_key or "")  # a concurrent submit with the same key won
        raise
    chunk_ids = [c.id for c in chunks]
    enqueued = enqueue_chunks(session, sender, chunks, prepared.model, request.priority, prepared.kind)
    return SubmitResult(job=job, created=True, chunk_ids=chunk_ids, enqueued=enqueued)


__all__ = [
    "IndexRange",
    "PreparedJob",
    "SubmissionError",
    "SubmitResult",
    "prepare_job",
    "store_job",
    "submit_job",
]
