"""The `lenses` kind: for each (prompt, layer, token), the readings researchers compare SelfIE with: the logit lens
(the final norm and output layer applied to the state) and Patchscopes' identity patch (the state written at the
last position of `cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?` at its own layer, one next-token prediction), each
with its top-k tokens and scored against the model's own next-token prediction at that position.

Request: `LensJobCreate` (the prompts and targets of an interpret job, `top_k`, `lenses`); planned as the interpret
kind plans (`submission.prepare_job`: the prompts, the targets grammar, the caps). Items: `[prompt_index, layer,
token]`. Inputs: the job's prompts. Results: `lens_readings`, unique per (job, prompt_index, layer, token).
Runner: `workers.runners.lenses` (`selfie_core.lenses.run_lenses`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from selfie_jobs.kinds import PreparedJob, ResultPage
from selfie_jobs.kinds.interpret import InterpretKind
from selfie_jobs.models import LensReading
from selfie_jobs.specs import Int, JobCreate, refuse_fields, schema_without, spec_batch_key, with_variant

#: as selfie_core.lenses (the api never imports torch)
LENS_NAMES = ("logit", "identity")
MAX_TOP_K = 100

LensName = Literal["logit", "identity"]
#: what an interpretation request sets about generating text, which a lens reading does not do
GENERATION_FIELDS = ("template", "k", "injection_mode", "injection_strength", "max_new_tokens", "decoding",
                     "grounding")


#: examples of the request's OpenAPI schema
EXAMPLES = [{"model": "smollm2-135m-instruct", "prompts": ["The Eiffel Tower is located in Paris."],
             "targets": {"layers": "all", "tokens": [-1]}, "top_k": 5, "lenses": ["logit", "identity"]}]


class LensJobCreate(JobCreate):
    """A request to read hidden states with the logit lens and the identity patch (the targets of `interpret`)."""

    # the interpretation's engine options it inherits and refuses are left out of its schema
    model_config = JobCreate.model_config | {"json_schema_extra": schema_without(GENERATION_FIELDS, EXAMPLES)}

    top_k: Annotated[Int, Field(ge=1, le=MAX_TOP_K)] = Field(5, description="Tokens kept per lens, best first.")
    lenses: Annotated[list[LensName], Field(min_length=1, max_length=len(LENS_NAMES))] = Field(
        default_factory=lambda: list(LENS_NAMES), description="Which lenses to run: 'logit', 'identity'.")

    @model_validator(mode="before")
    @classmethod
    def _nothing_generated(cls, data: Any) -> Any:
        # the engine options of an interpretation would be accepted and ignored: refused, so nobody believes them
        return refuse_fields(data, GENERATION_FIELDS, "a lenses job generates nothing: {fields} do(es) not apply to it")

    @field_validator("lenses")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each lens at most once")
        return value


@dataclass(frozen=True)
class LensRow:
    """One lens reading ready to be stored."""

    TABLE: ClassVar[type] = LensReading
    ITEM_COLUMNS: ClassVar[tuple[str, ...]] = ("prompt_index", "layer", "token")

    prompt_index: int
    layer: int
    token: int
    source_token: str
    lenses: dict[str, Any]  # column name -> value (model_*, logit_*, identity_*)

    @property
    def item(self) -> tuple[int, int, int]:
        return (self.prompt_index, self.layer, self.token)

    def values(self, storable: Any) -> dict[str, Any]:
        out = {"prompt_index": self.prompt_index, "layer": self.layer, "token": self.token,
               "source_token": storable(self.source_token)}
        for name, value in self.lenses.items():
            # decoded tokens are texts like any other: made storable (NUL, lone surrogates) the same way
            out[name] = [storable(t) for t in value] if name.endswith("_tokens") and value is not None else value
        return out


def _top(prefix: str, top: Any) -> dict[str, Any]:
    if top is None:
        return {f"{prefix}_token_ids": None, f"{prefix}_tokens": None, f"{prefix}_probs": None}
    return {f"{prefix}_token_ids": [int(t) for t in top.token_ids], f"{prefix}_tokens": list(top.tokens),
            f"{prefix}_probs": [float(p) for p in top.probs]}


class LensesKind(InterpretKind):
    """Prompts, items and their inputs as the interpret kind's; its own spec, rows and table."""

    name = "lenses"
    request = LensJobCreate
    table = LensReading
    item_columns = LensRow.ITEM_COLUMNS
    noun = "lens readings"
    csv_columns = ("prompt_index", "layer", "token", "source_token",
                   "model_tokens", "model_probs", "model_token_ids",
                   "logit_tokens", "logit_probs", "logit_token_ids", "logit_matches", "logit_model_prob",
                   "identity_tokens", "identity_probs", "identity_token_ids", "identity_matches",
                   "identity_model_prob", "worker", "model", "created_at")

    def prepare(self, session: Session, request: LensJobCreate, settings: Any) -> PreparedJob:
        from selfie_jobs.submission import prepare_job

        planned = prepare_job(session, request, settings)
        # What the runner needs: no template, injection or generation (a lens generates nothing).
        spec = with_variant(request, {"lenses": list(request.lenses), "top_k": request.top_k})
        return PreparedJob(model=planned.model, spec=spec, batch_key=spec_batch_key({"kind": self.name, **spec}),
                           prompts=planned.prompts, items=planned.items, kind=self.name)

    def row_from(self, result: Any) -> LensRow:
        _, prompt_index, layer, token = result.key
        columns = {**_top("model", result.model), **_top("logit", result.logit), **_top("identity", result.identity)}
        columns.update(logit_matches=result.matches("logit"), logit_model_prob=result.logit_model_prob,
                       identity_matches=result.matches("identity"), identity_model_prob=result.identity_model_prob)
        return LensRow(prompt_index=int(prompt_index), layer=int(layer), token=int(token),
                       source_token=result.source_token or "", lenses=columns)

    def read_page(self, session: Session, job_id: str, *, limit: int | None, cursor: str | None) -> ResultPage:
        from selfie_jobs.queries import QueryError, decode_cursor, encode_cursor, fetch_page

        order = (LensReading.prompt_index, LensReading.layer, LensReading.token)
        query = select(LensReading).where(LensReading.job_id == job_id)
        if cursor:
            after = decode_cursor(cursor, "lenses", 3)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in after):
                raise QueryError("malformed cursor")
            from sqlalchemy import tuple_

            query = query.where(tuple_(*order) > tuple_(*after))
        query = query.order_by(*order)
        rows, next_cursor = fetch_page(session, query, limit, lambda last: encode_cursor(
            "lenses", [last.prompt_index, last.layer, last.token]))
        return ResultPage([{c: getattr(r, c) for c in self.csv_columns} for r in rows], next_cursor)

    def export_rows(self, session: Session, job_id: str, *, limit: int | None) -> Iterator[Sequence[Any]]:
        from selfie_jobs.queries import export_columns, stream_rows

        query = (select(*export_columns(LensReading, self.csv_columns)).where(LensReading.job_id == job_id)
                 .order_by(LensReading.prompt_index, LensReading.layer, LensReading.token))
        return stream_rows(session, query, limit)
