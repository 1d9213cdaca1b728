"""The `vectors` kind: interpret vectors the user brings (probe or steering directions, SAE features), or
expressions over hidden states the worker extracts itself ("what does state(A) - state(B) mean?").

Request: `VectorJobCreate`: `vectors` (lists of floats, optional `labels`) or `expressions` (each a list of terms
`{"coef", "prompt", "layer", "token"}`: the vector is the sum of coef * hidden_states[layer][token] of the prompt;
a JSON form, never code). Validated against the model card here (hidden size, depth, the prompts' tokens), without
torch. Items: `[vector_index]`. Inputs: `job_vectors`. Results: `vector_interpretations`, unique per
(job, vector_index), with the label, the interpreted vector's norm, text, per-token and mean relevancy.
Runner: `workers.runners.vectors`. Uploads (.npy, .safetensors) become this request in `selfie_jobs.vector_files`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from selfie_jobs.cards import card_tokenizer
from selfie_jobs.errors import SubmissionError
from selfie_jobs.kinds import JobKind, PreparedJob, ResultPage, WorkInput
from selfie_jobs.models import JobVector, VectorInterpretation
from selfie_jobs.specs import EngineJobFields, Float, Index, SafeStr, engine_spec, resolve_index, spec_batch_key

# Hard ceilings whatever the settings say (the configurable caps are checked in `prepare`).
MAX_VECTORS_HARD = 100_000
MAX_HIDDEN_SIZE = 65_536
MAX_TERMS_HARD = 256
MAX_LABEL_CHARS = 200
# The engine computes a vector in float32 (selfie_core.validation.vector_tensor) and refuses one that is not finite
# there: a finite JSON number past this overflows to infinity, so the API refuses it as the engine would.
FLOAT32_MAX = 3.4028234663852886e38

# Strict, as every number of a request body (specs.Float/Int): a JSON true or "1" is not a number; ints are floats.
Number = Float


class StateTerm(BaseModel):
    """coef * hidden_states[layer][token] of `prompt` (layer 0 = embeddings; token negative from the end)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    coef: Annotated[Number, Field(ge=-1e6, le=1e6)] = 1.0
    prompt: Annotated[SafeStr, Field(min_length=1, max_length=100_000)]
    layer: Index
    token: Index


class Expression(BaseModel):
    """A scaled sum of hidden states: e.g. state(A, 12, -1) - state(B, 12, -1) is two terms, coef 1 and -1."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    terms: Annotated[list[StateTerm], Field(min_length=1, max_length=MAX_TERMS_HARD)]


class VectorJobCreate(EngineJobFields):
    """A request to interpret vectors of a model's hidden size, given as values or as expressions over states."""

    model_config = EngineJobFields.model_config | {
        "json_schema_extra": {
            "examples": [
                {"model": "smollm2-135m-instruct", "vectors": [[0.0, 0.1, -0.2]], "labels": ["probe"]},
                {"expressions": [{"terms": [
                    {"coef": 1.0, "prompt": "The capital of France is Paris.", "layer": 12, "token": -1},
                    {"coef": -1.0, "prompt": "The capital of Italy is Rome.", "layer": 12, "token": -1}]}]},
            ]
        }
    }

    vectors: Annotated[
        list[Annotated[list[Number], Field(min_length=1, max_length=MAX_HIDDEN_SIZE)]],
        Field(min_length=1, max_length=MAX_VECTORS_HARD),
    ] | None = Field(None, description="Vectors of the model's hidden size.")
    expressions: Annotated[list[Expression], Field(min_length=1, max_length=MAX_VECTORS_HARD)] | None = Field(
        None, description="Scaled sums of hidden states the worker extracts."
    )
    labels: Annotated[
        list[Annotated[SafeStr, Field(max_length=MAX_LABEL_CHARS)]], Field(min_length=1, max_length=MAX_VECTORS_HARD)
    ] | None = Field(None, description="One label per vector (default: none).")

    @model_validator(mode="after")
    def _one_source(self) -> VectorJobCreate:
        if (self.vectors is None) == (self.expressions is None):
            raise ValueError("give exactly one of 'vectors' or 'expressions'")
        count = len(self.vectors if self.vectors is not None else self.expressions or [])
        if self.labels is not None and len(self.labels) != count:
            raise ValueError(f"{len(self.labels)} labels for {count} vectors: give one label per vector")
        return self

    @property
    def count(self) -> int:
        return len(self.vectors if self.vectors is not None else self.expressions or [])


@dataclass(frozen=True)
class VectorRow:
    """One interpreted vector ready to be stored."""

    TABLE: ClassVar[type] = VectorInterpretation
    ITEM_COLUMNS: ClassVar[tuple[str, ...]] = ("vector_index",)

    vector_index: int
    label: str
    norm: float
    text: str
    token_ids: list[int]
    relevancy: list[float]
    mean_relevancy: float

    @property
    def item(self) -> tuple[int]:
        return (self.vector_index,)

    def values(self, storable: Any) -> dict[str, Any]:
        return {"vector_index": self.vector_index, "label": storable(self.label), "norm": self.norm,
                "text": storable(self.text), "token_ids": list(self.token_ids), "relevancy": list(self.relevancy),
                "mean_relevancy": self.mean_relevancy}


class VectorsKind(JobKind):
    name = "vectors"
    request = VectorJobCreate
    table = VectorInterpretation
    item_columns = VectorRow.ITEM_COLUMNS
    noun = "vectors"
    csv_columns = ("vector_index", "label", "norm", "text", "mean_relevancy", "relevancy", "token_ids", "worker",
                   "model", "created_at")

    def prepare(self, session: Session, request: VectorJobCreate, settings: Any) -> PreparedJob:
        from selfie_jobs import submission as sub

        model = request.model or settings.default_model
        if request.count > settings.max_vectors_per_job:
            raise SubmissionError(f"the job has {request.count} vectors; at most {settings.max_vectors_per_job} "
                                      "per job (split it into several jobs)", field="vectors", status=413)
        card, template, _ = sub.check_engine_fields(session, request, model, settings)
        hidden = card.hidden_size
        inputs: list[dict[str, Any]] = []
        labels = request.labels or [""] * request.count
        if request.vectors is not None:
            for i, vector in enumerate(request.vectors):
                if len(vector) != hidden:
                    raise SubmissionError(
                        f"vector {i} has {len(vector)} values; {model!r} has hidden size {hidden}", field="vectors")
                values = [float(v) for v in vector]
                if any(abs(v) > FLOAT32_MAX for v in values):
                    raise SubmissionError(f"vector {i} has a value past the float32 range (+-3.4e38) that the "
                                          "engine computes in", field="vectors")
                inputs.append({"label": labels[i], "vector": values, "expression": None})
        else:
            inputs = self._expressions(request, card, labels, settings)
        spec = engine_spec(request, template)
        # The kind is part of the batch key: a vectors chunk is never batched with other kinds' chunks.
        return PreparedJob(model=model, spec=spec, batch_key=spec_batch_key({"kind": self.name, **spec}),
                           prompts=[], items=[[i] for i in range(request.count)], kind=self.name, inputs=inputs)

    @staticmethod
    def _expressions(request: VectorJobCreate, card: Any, labels: list[str], settings: Any) -> list[dict[str, Any]]:
        tokenizer = card_tokenizer(card)
        token_counts: dict[str, int] = {}
        inputs = []
        for i, expression in enumerate(request.expressions or []):
            where = f"expressions[{i}]"
            if len(expression.terms) > settings.max_expression_terms:
                raise SubmissionError(f"{where} has {len(expression.terms)} terms; at most "
                                          f"{settings.max_expression_terms}", field=f"{where}.terms")
            terms = []
            for j, term in enumerate(expression.terms):
                at = f"{where}.terms[{j}]"
                if len(term.prompt) > settings.max_prompt_chars:
                    raise SubmissionError(f"{at}: the prompt has {len(term.prompt)} characters; at most "
                                              f"{settings.max_prompt_chars}", field=f"{at}.prompt")
                if not term.prompt.strip():
                    raise SubmissionError(f"{at}: the prompt is empty", field=f"{at}.prompt")
                if term.prompt not in token_counts:
                    if len(token_counts) >= settings.max_prompts_per_job:
                        raise SubmissionError(f"the expressions use more than {settings.max_prompts_per_job} "
                                                  "distinct prompts", field="expressions")
                    token_counts[term.prompt] = len(tokenizer.encode(term.prompt).ids)
                n_tokens = token_counts[term.prompt]
                if not n_tokens or n_tokens > card.max_context:
                    raise SubmissionError(f"{at}: the prompt has {n_tokens} tokens; {card.name!r} takes 1.."
                                              f"{card.max_context}", field=f"{at}.prompt")
                try:
                    resolve_index(term.layer, card.num_layers + 1, "layer")
                    resolve_index(term.token, n_tokens, f"token (the prompt has {n_tokens} tokens)")
                except ValueError as exc:
                    raise SubmissionError(f"{at}: {exc}", field=at) from None
                if term.layer < 0:
                    raise SubmissionError(f"{at}: layer {term.layer} must be 0..{card.num_layers}",
                                              field=f"{at}.layer")
                terms.append({"coef": float(term.coef), "prompt": term.prompt, "layer": term.layer,
                              "token": term.token})
            inputs.append({"label": labels[i], "vector": None, "expression": {"terms": terms}})
        return inputs

    def store_inputs(self, session: Session, job_id: str, prepared: PreparedJob) -> None:
        session.add_all(JobVector(job_id=job_id, index=i, **row) for i, row in enumerate(prepared.inputs or []))

    def load_inputs(self, session: Session, chunks: Sequence[Any]) -> dict[tuple[str, int], JobVector]:
        by_job: dict[str, set[int]] = {}
        for chunk in chunks:
            by_job.setdefault(chunk.job_id, set()).update(item[0] for item in chunk.items)
        out: dict[tuple[str, int], Any] = {}
        for job_id, indices in by_job.items():
            rows = session.execute(select(JobVector.index, JobVector.label, JobVector.vector, JobVector.expression)
                                   .where(JobVector.job_id == job_id, JobVector.index.in_(sorted(indices))))
            for index, label, vector, expression in rows.all():
                out[(job_id, index)] = (label, {"values": vector} if vector is not None else dict(expression or {}))
        return out

    def work_inputs(self, chunk: Any, inputs: dict[tuple[str, int], Any]) -> list[WorkInput]:
        out = []
        for item in chunk.items:
            found = inputs.get((chunk.job_id, item[0]))
            if found is None:
                raise LookupError(f"job {chunk.job_id} has no vector {item[0]}")
            label, payload = found
            out.append(WorkInput(tuple(item), label, payload))
        return out

    def row_from(self, result: Any) -> VectorRow:
        _, vector_index = result.key
        return VectorRow(vector_index=int(vector_index), label=result.label or "", norm=float(result.norm),
                         text=result.text, token_ids=[int(t) for t in result.token_ids],
                         relevancy=[float(r) for r in result.relevancy], mean_relevancy=float(result.mean_relevancy))

    def describe(self, item: Sequence[int]) -> str:
        return f"vector {item[0]}"

    def read_page(self, session: Session, job_id: str, *, limit: int | None, cursor: str | None) -> ResultPage:
        from selfie_jobs.queries import decode_cursor, encode_cursor, fetch_page

        query = select(VectorInterpretation).where(VectorInterpretation.job_id == job_id)
        if cursor:
            (after,) = decode_cursor(cursor, "vectors", 1)
            if not isinstance(after, int):
                from selfie_jobs.queries import QueryError

                raise QueryError("malformed cursor")
            query = query.where(VectorInterpretation.vector_index > after)
        query = query.order_by(VectorInterpretation.vector_index)
        rows, next_cursor = fetch_page(session, query, limit,
                                       lambda last: encode_cursor("vectors", [last.vector_index]))
        return ResultPage([{c: getattr(r, c) for c in self.csv_columns} for r in rows], next_cursor)

    def export_rows(self, session: Session, job_id: str, *, limit: int | None) -> Iterator[Sequence[Any]]:
        from selfie_jobs.queries import export_columns, stream_rows

        query = (select(*export_columns(VectorInterpretation, self.csv_columns))
                 .where(VectorInterpretation.job_id == job_id).order_by(VectorInterpretation.vector_index))
        return stream_rows(session, query, limit)
