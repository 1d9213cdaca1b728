"""The edit kinds, `supervised` and `reinforce`: train one decoder block's MLP through hidden states (the SelfIE
paper's Supervised and Reinforcement Control) and store the result as a model variant.

Requests: `SupervisedEditCreate`, `ReinforceEditCreate` (`selfie_jobs.kinds.edit_requests`), validated here against
the model card (depth, hidden size, the prompts' tokens) and the settings' limits, without torch; everything the
worker needs goes into the job's spec (no inputs table). One job is one chunk of one item `[0]`; its batch key is
unique to the job, so a claim never batches an edit with anything else.

Results: the `variants` row (`models.Variant`, unique per job) is the job's result row, written by the normal write
path with the chunk marked done in the same transaction; `edit_epochs` (one row per epoch, upserted by the worker
as the edit trains) is its progress. The results route pages the epochs and carries the variant
(`ResultPage.extra`). Runner: `workers.runners.edits`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from selfie_jobs.cards import card_tokenizer
from selfie_jobs.errors import SubmissionError
from selfie_jobs.kinds import JobKind, PreparedJob, ResultPage, WorkInput
from selfie_jobs.kinds.edit_requests import (
    EditFields,
    ModelJudge,
    ReinforceEditCreate,
    StateRef,
    SupervisedEditCreate,
)
from selfie_jobs.models import EditEpoch, Job, Variant
from selfie_jobs.specs import resolve_index, spec_batch_key

EDIT_KINDS = ("supervised", "reinforce")
FLOAT32_MAX = 3.4028234663852886e38
EPOCH_COLUMNS = ("epoch", "loss", "edit_loss", "keep_loss", "bad_share", "rewards", "interpretations", "created_at")
VARIANT_COLUMNS = ("id", "job_id", "method", "layer", "model", "path", "sha256", "settings", "losses", "evaluations",
                   "worker", "created_at")


def finite_or_none(value: Any) -> float | None:
    """A stored figure: None where it is missing or not finite (JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class VariantRow:
    """An edit's variant ready to be stored (the job's one result row)."""

    TABLE: ClassVar[type] = Variant
    ITEM_COLUMNS: ClassVar[tuple[str, ...]] = ()  # unique per job: a redelivered edit stores nothing more

    variant_id: str
    owner_key_id: int | None
    method: str
    layer: int
    path: str
    sha256: str
    settings: dict[str, Any]
    losses: list[dict[str, Any]]
    evaluations: dict[str, Any]

    @property
    def item(self) -> tuple[int]:
        return (0,)

    def values(self, storable: Any) -> dict[str, Any]:
        return {"id": self.variant_id, "owner_key_id": self.owner_key_id, "method": self.method, "layer": self.layer,
                "path": self.path, "sha256": self.sha256, "settings": self.settings, "losses": self.losses,
                "evaluations": self.evaluations}


def _tokens(card: Any, text: str, where: str, settings: Any) -> int:
    if len(text) > settings.max_prompt_chars:
        raise SubmissionError(f"{where}: the prompt has {len(text)} characters; at most {settings.max_prompt_chars}",
                              field=where)
    if not text.strip():
        raise SubmissionError(f"{where}: the prompt is empty", field=where)
    n = len(card_tokenizer(card).encode(text).ids)
    if not n or n > card.max_context:
        raise SubmissionError(f"{where}: the prompt has {n} tokens; {card.name!r} takes 1..{card.max_context}",
                              field=where)
    return n


def _edit_layer(layer: int, card: Any, where: str) -> int:
    """An edit changes the MLP of block layer - 1: layer 0 (the embeddings) has none, and there is no block past
    the last."""
    if not 1 <= layer <= card.num_layers:
        raise SubmissionError(f"{where}: layer {layer} is out of range: an edit changes the MLP of decoder block "
                              f"layer - 1, so use 1..{card.num_layers} for {card.name!r}", field=where)
    return layer


def _token(token: int, n_tokens: int, where: str) -> int:
    try:
        return resolve_index(token, n_tokens, f"token (the prompt has {n_tokens} tokens)")
    except ValueError as exc:
        raise SubmissionError(f"{where}: {exc}", field=where) from None


def _state(ref: StateRef, card: Any, where: str, settings: Any) -> dict[str, Any]:
    n = _tokens(card, ref.prompt, f"{where}.prompt", settings)
    if not 0 <= ref.layer <= card.num_layers:
        raise SubmissionError(f"{where}: layer {ref.layer} must be 0..{card.num_layers}", field=f"{where}.layer")
    return {"prompt": ref.prompt, "layer": ref.layer, "token": _token(ref.token, n, f"{where}.token")}


#: Greedy new tokens of the knowledge evaluation (selfie_core.edit_evals.knowledge's default).
KNOWLEDGE_NEW_TOKENS = 8


def _check_text(card: Any, text: str, where: str, settings: Any, new_tokens: int, extra_tokens: int = 0) -> None:
    """A text the evaluation generates from: the checks a prompt gets (characters, not blank, its tokens, with
    `extra_tokens` more around it and `new_tokens`, within the context)."""
    if len(text) > settings.max_prompt_chars:
        raise SubmissionError(f"{where} has {len(text)} characters; at most {settings.max_prompt_chars}",
                              field=where, status=413)
    if not text.strip():
        raise SubmissionError(f"{where} is empty", field=where)
    n = len(card_tokenizer(card).encode(text).ids) + extra_tokens
    if n + new_tokens > card.max_context:
        raise SubmissionError(f"{where} has {n} tokens as asked; with {new_tokens} new tokens that exceeds the "
                              f"context of {card.name!r} ({card.max_context} tokens)", field=where)


def _chat_turn_tokens(card: Any) -> int:
    turn = (card.card or {}).get("chat_turn_tokens")
    return turn if isinstance(turn, int) and not isinstance(turn, bool) else 0


def _evaluations(request: EditFields, card: Any, settings: Any) -> dict[str, Any]:
    from selfie_jobs.audit_detectors import DetectorConfigError, only_known_fields, validate

    out: dict[str, Any] = {}
    knowledge = request.evaluations.knowledge
    if knowledge is not None:
        facts = knowledge.facts
        if facts is not None and len(facts) > settings.max_eval_items:
            raise SubmissionError(f"{len(facts)} facts; at most {settings.max_eval_items}",
                                  field="evaluations.knowledge.facts", status=413)
        for i, fact in enumerate(facts or ()):
            _check_text(card, fact.prompt, f"evaluations.knowledge.facts[{i}].prompt", settings, KNOWLEDGE_NEW_TOKENS)
            if not fact.attribute.strip():
                raise SubmissionError(f"evaluations.knowledge.facts[{i}].attribute is empty",
                                      field=f"evaluations.knowledge.facts[{i}].attribute")
        out["knowledge"] = {"facts": None if facts is None else [f.model_dump() for f in facts]}
    behaviour = request.evaluations.behaviour
    if behaviour is not None:
        if len(behaviour.requests) > settings.max_eval_items:
            raise SubmissionError(f"{len(behaviour.requests)} behaviour requests; at most {settings.max_eval_items}",
                                  field="evaluations.behaviour.requests", status=413)
        if behaviour.max_new_tokens > settings.max_new_tokens_cap:
            raise SubmissionError(f"evaluations.behaviour.max_new_tokens={behaviour.max_new_tokens}; at most "
                                  f"{settings.max_new_tokens_cap}", field="evaluations.behaviour.max_new_tokens")
        try:
            only_known_fields(behaviour.detector)
            (detector,) = validate([behaviour.detector])
        except DetectorConfigError as exc:
            raise SubmissionError(f"evaluations.behaviour.detector: {exc}", field="evaluations.behaviour.detector") from None
        for i, text in enumerate(behaviour.requests):
            # the request as it is asked plainly, in one chat turn (the prompt-injection story around it is the
            # service's own text, as an interpretation template's is)
            _check_text(card, text, f"evaluations.behaviour.requests[{i}]", settings, behaviour.max_new_tokens,
                        extra_tokens=_chat_turn_tokens(card))
        out["behaviour"] = {"requests": list(behaviour.requests), "detector": detector,
                            "max_new_tokens": behaviour.max_new_tokens}
    return out


class _EditKind(JobKind):
    table = Variant
    item_columns = ()
    noun = "epochs"
    csv_columns = EPOCH_COLUMNS

    def _common(self, session: Session, request: EditFields, settings: Any) -> tuple[str, Any, dict[str, Any]]:
        from selfie_jobs import submission as sub

        model = request.model or settings.default_model
        if request.epochs > settings.max_edit_epochs:
            raise SubmissionError(f"epochs={request.epochs}; at most {settings.max_edit_epochs} "
                                  "(SELFIE_MAX_EDIT_EPOCHS)", field="epochs", status=413)
        card, template, _ = sub.check_engine_fields(session, request, model, settings)
        common = {"method": self.name, "epochs": request.epochs, "lr": float(request.lr), "seed": request.seed,
                  # the template of the interpretations the edit reads and shows (None: the kind's default)
                  "template": template if request.template is not None else None,
                  "injection": {"k": request.k}, "generation": {"max_new_tokens": request.max_new_tokens},
                  "evaluations": _evaluations(request, card, settings)}
        return model, card, common

    def _prepared(self, model: str, spec: dict[str, Any]) -> PreparedJob:
        # A key of its own: an edit's chunk is never claimed as another job's companion, nor the other way round.
        key = spec_batch_key({"kind": self.name, "job": uuid.uuid4().hex})
        return PreparedJob(model=model, spec=spec, batch_key=key, prompts=[], items=[[0]], kind=self.name)

    def store_inputs(self, session: Session, job_id: str, prepared: PreparedJob) -> None:
        return None  # everything is in the spec

    def load_inputs(self, session: Session, chunks: Sequence[Any]) -> dict[Any, Any]:
        jobs = sorted({c.job_id for c in chunks})
        rows = session.execute(select(Job.id, Job.owner_key_id, Job.priority).where(Job.id.in_(jobs))).all()
        return {("edit", job_id): {"owner_key_id": owner, "priority": priority} for job_id, owner, priority in rows}

    def work_inputs(self, chunk: Any, inputs: dict[Any, Any]) -> list[WorkInput]:
        # the job's key owns its variant (and any sub-job it submits); sub-jobs run at its priority
        return [WorkInput(tuple(item), "", inputs.get(("edit", chunk.job_id)) or {}) for item in chunk.items]

    def row_from(self, result: Any) -> VariantRow:
        return VariantRow(variant_id=result.variant_id, owner_key_id=result.owner_key_id, method=self.name,
                          layer=int(result.layer), path=result.path, sha256=result.sha256, settings=result.settings,
                          losses=result.losses, evaluations=result.evaluations)

    def describe(self, item: Sequence[int]) -> str:
        return "the edit"

    def progress(self, session: Session, job: Any) -> dict[str, Any]:
        """Epochs done of the total, for the job's status."""
        done = session.scalar(select(func.count()).select_from(EditEpoch).where(EditEpoch.job_id == job.id))
        return {"epochs_done": int(done or 0), "epochs_total": int((job.spec or {}).get("epochs") or 0)}

    def read_page(self, session: Session, job_id: str, *, limit: int | None, cursor: str | None) -> ResultPage:
        from selfie_jobs.queries import QueryError, decode_cursor, encode_cursor, fetch_page

        query = select(EditEpoch).where(EditEpoch.job_id == job_id)
        if cursor:
            (after,) = decode_cursor(cursor, "epochs", 1)
            if not isinstance(after, int):
                raise QueryError("malformed cursor")
            query = query.where(EditEpoch.epoch > after)
        rows, next_cursor = fetch_page(session, query.order_by(EditEpoch.epoch), limit,
                                       lambda last: encode_cursor("epochs", [last.epoch]))
        variant = session.scalars(select(Variant).where(Variant.job_id == job_id)).first()
        extra = {"variant": None if variant is None else {c: getattr(variant, c) for c in VARIANT_COLUMNS}}
        return ResultPage([{c: getattr(r, c) for c in self.csv_columns} for r in rows], next_cursor, extra)

    def export_rows(self, session: Session, job_id: str, *, limit: int | None) -> Iterator[Sequence[Any]]:
        from selfie_jobs.queries import export_columns, stream_rows

        query = (select(*export_columns(EditEpoch, self.csv_columns)).where(EditEpoch.job_id == job_id)
                 .order_by(EditEpoch.epoch))
        return stream_rows(session, query, limit)


class SupervisedKind(_EditKind):
    name = "supervised"
    request = SupervisedEditCreate

    def prepare(self, session: Session, request: SupervisedEditCreate, settings: Any) -> PreparedJob:
        model, card, common = self._common(session, request, settings)
        n = _tokens(card, request.source.prompt, "source.prompt", settings)
        source = {"prompt": request.source.prompt, "layer": _edit_layer(request.source.layer, card, "source.layer"),
                  "token": _token(request.source.token, n, "source.token")}
        vector = None
        if request.target_vector is not None:
            if len(request.target_vector) != card.hidden_size:
                raise SubmissionError(f"target_vector has {len(request.target_vector)} values; {model!r} has hidden "
                                      f"size {card.hidden_size}", field="target_vector")
            vector = [float(v) for v in request.target_vector]
            if any(abs(v) > FLOAT32_MAX for v in vector):
                raise SubmissionError("target_vector has a value past the float32 range (+-3.4e38)",
                                      field="target_vector")
        texts = request.reference_texts
        if texts is not None:
            if len(texts) > settings.max_reference_texts:
                raise SubmissionError(f"{len(texts)} reference texts; at most {settings.max_reference_texts} "
                                      "(SELFIE_MAX_REFERENCE_TEXTS)", field="reference_texts", status=413)
            for i, text in enumerate(texts):
                if len(text) > settings.max_reference_chars:
                    raise SubmissionError(f"reference text {i} has {len(text)} characters; at most "
                                          f"{settings.max_reference_chars} (SELFIE_MAX_REFERENCE_CHARS)",
                                          field=f"reference_texts[{i}]", status=413)
                if not text.strip():
                    raise SubmissionError(f"reference text {i} is empty", field=f"reference_texts[{i}]")
        spec = {**common, "source": source, "target_vector": vector,
                "target": _state(request.target, card, "target", settings) if request.target is not None else None,
                # None: the built-in set (selfie_core/data/reference_texts.txt), read by the worker
                "reference_texts": list(texts) if texts is not None else None,
                "beta": float(request.beta), "anchor": request.anchor, "refs_per_epoch": request.refs_per_epoch}
        return self._prepared(model, spec)


class ReinforceKind(_EditKind):
    name = "reinforce"
    request = ReinforceEditCreate

    def prepare(self, session: Session, request: ReinforceEditCreate, settings: Any) -> PreparedJob:
        model, card, common = self._common(session, request, settings)
        positions = _tokens(card, request.prompt, "prompt", settings)
        judge = self._judge(session, request, model, card, settings)
        quota_items = 1
        if judge.get("remote"):
            # each epoch's sub-job holds one judge prompt per position of the prompt, and is a job like any other
            if positions > settings.max_prompts_per_job:
                raise SubmissionError(
                    f"prompt: {positions} positions, each judged by {judge['model']!r} in one prompt of each epoch's "
                    f"generate job, which takes at most {settings.max_prompts_per_job} prompts "
                    "(SELFIE_MAX_PROMPTS_PER_JOB): use a shorter prompt or a judge on the edited model", field="prompt")
            # what the edit will cost the key's quota: its own item and at least its epochs' judge generations
            quota_items += request.epochs * positions
        spec = {**common, "prompt": request.prompt, "layer": _edit_layer(request.layer, card, "layer"), "judge": judge}
        return replace(self._prepared(model, spec), quota_items=quota_items)

    @staticmethod
    def _judge(session: Session, request: ReinforceEditCreate, model: str, card: Any,
               settings: Any) -> dict[str, Any]:
        from selfie_jobs.audit_detectors import DetectorConfigError, validate
        from selfie_jobs.cards import load_card
        from selfie_jobs.liveness import live_workers

        judge = request.judge
        if not isinstance(judge, ModelJudge):
            try:
                (detector,) = validate([judge.detector_config()])
            except DetectorConfigError as exc:
                raise SubmissionError(f"judge: {exc}", field="judge") from None
            return {"type": "detector", "detector": detector, "clean": judge.clean}
        out = judge.model_dump()
        out["model"] = judge.model or model
        out["remote"] = out["model"] != model
        if not out["remote"]:
            # judged in the edit's worker, in the edited model's chat format
            if not (card.card or {}).get("chat_template"):
                raise SubmissionError(f"judge: model {model!r} has no chat template to ask the judge's question in; "
                                      "use a detector judge or a judge model with one", field="judge")
            return out
        # Served by other workers: the worker asks it through `generate` jobs on its queue, checked here as one.
        from selfie_jobs.kinds import get_kind
        from selfie_jobs.kinds.generate import GenerateJobCreate

        sample = GenerateJobCreate(model=out["model"], chat=True, max_new_tokens=judge.max_new_tokens,
                                   prompts=[judge.question.format(interpretation="an interpretation")])
        try:
            load_card(session, out["model"], settings.worker_alive_seconds)
            get_kind("generate").prepare(session, sample, settings)
        except SubmissionError as exc:
            raise SubmissionError(f"judge.model: {exc}", field="judge.model", status=exc.status) from None
        # a card outlives its workers: with none alive, the edit's sub-jobs would wait and the edit with them
        if not live_workers(session, settings.worker_alive_seconds, model=out["model"]):
            raise SubmissionError(f"judge.model: no live worker serves {out['model']!r} (a judge model nobody "
                                  "serves)", field="judge.model")
        return out
