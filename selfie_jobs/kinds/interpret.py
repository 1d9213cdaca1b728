"""The `interpret` kind: (prompt, layer, token) -> what the model says about that hidden state (the paper's job).

Request: `selfie_jobs.specs.JobCreate`, validated against the model card by `selfie_jobs.submission.prepare_job`.
Items: `[prompt_index, layer, token]`. Inputs: the job's prompts (`prompts` table). Results: `interpretations`,
unique per (job, prompt_index, layer, token). Runner: `workers.runners.interpret`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from selfie_jobs.csv_cells import CsvMode
from selfie_jobs.kinds import JobKind, PreparedJob, ResultPage, WorkInput
from selfie_jobs.models import Interpretation, Prompt
from selfie_jobs.specs import JobCreate


@dataclass(frozen=True)
class ResultRow:
    """One interpretation ready to be stored (plain values, built by the worker from an engine record)."""

    TABLE: ClassVar[type] = Interpretation
    ITEM_COLUMNS: ClassVar[tuple[str, ...]] = ("prompt_index", "layer", "token")

    prompt_index: int
    layer: int
    token: int
    source_token: str
    text: str
    token_ids: list[int]
    relevancy: list[float]
    mean_relevancy: float
    grounded: bool | None = None
    ungrounded_reason: str | None = None

    @property
    def item(self) -> tuple[int, int, int]:
        return (self.prompt_index, self.layer, self.token)

    def values(self, storable: Any) -> dict[str, Any]:
        """Column values of this row; `storable` makes a text storable (see `chunks.storable_text`)."""
        return {
            "prompt_index": self.prompt_index,
            "layer": self.layer,
            "token": self.token,
            "source_token": storable(self.source_token),
            "text": storable(self.text),
            "token_ids": list(self.token_ids),
            "relevancy": list(self.relevancy),
            "mean_relevancy": self.mean_relevancy,
            "grounded": self.grounded,
            "ungrounded_reason": self.ungrounded_reason,
        }


class InterpretKind(JobKind):
    name = "interpret"
    request = JobCreate
    table = Interpretation
    item_columns = ResultRow.ITEM_COLUMNS
    noun = "interpretations"
    csv_columns = ("prompt_index", "layer", "token", "source_token", "text", "mean_relevancy", "grounded",
                   "ungrounded_reason", "relevancy", "token_ids", "worker", "model", "created_at")

    def prepare(self, session: Session, request: JobCreate, settings: Any) -> PreparedJob:
        from selfie_jobs.submission import prepare_job

        return prepare_job(session, request, settings)

    def store_inputs(self, session: Session, job_id: str, prepared: PreparedJob) -> None:
        session.add_all(
            Prompt(job_id=job_id, index=i, text=text, tokens=tokens) for i, (text, tokens) in enumerate(prepared.prompts)
        )

    def load_inputs(self, session: Session, chunks: Sequence[Any]) -> dict[tuple[str, int], str]:
        """Prompt texts for (job id, prompt index) of the chunks' items."""
        wanted = {(c.job_id, item[0]) for c in chunks for item in c.items}
        if not wanted:
            return {}
        job_ids = {j for j, _ in wanted}
        rows = session.execute(select(Prompt.job_id, Prompt.index, Prompt.text).where(Prompt.job_id.in_(job_ids)))
        return {(j, i): t for j, i, t in rows.all() if (j, i) in wanted}

    def work_inputs(self, chunk: Any, inputs: dict[tuple[str, int], str]) -> list[WorkInput]:
        out = []
        for item in chunk.items:
            text = inputs.get((chunk.job_id, item[0]))
            if text is None:
                raise LookupError(f"job {chunk.job_id} has no prompt {item[0]}")
            out.append(WorkInput(tuple(item), text))
        return out

    def row_from(self, result: Any) -> ResultRow:
        _, prompt_index, layer, token = result.key
        return ResultRow(
            prompt_index=int(prompt_index),
            layer=int(layer),
            token=int(token),
            source_token=result.source_token or "",
            text=result.text,
            token_ids=[int(t) for t in result.token_ids],
            relevancy=[float(r) for r in result.relevancy],
            mean_relevancy=float(result.mean_relevancy),
            grounded=getattr(result, "grounded", None),
            ungrounded_reason=getattr(result, "ungrounded_reason", None),
        )

    def describe(self, item: Sequence[int]) -> str:
        p, layer, token = item
        return f"prompt {p}, layer {layer}, token {token}"

    def read_page(self, session: Session, job_id: str, *, limit: int | None, cursor: str | None) -> ResultPage:
        from selfie_jobs.queries import InterpretationFilter, interpretations_page

        page = interpretations_page(session, job_id, InterpretationFilter(), limit=limit, cursor=cursor)
        return ResultPage([_as_dict(row) for row in page.rows], page.next_cursor)

    def export_rows(self, session: Session, job_id: str, *, limit: int | None) -> Iterator[Sequence[Any]]:
        from selfie_jobs.queries import InterpretationFilter, export_interpretations

        return export_interpretations(session, job_id, InterpretationFilter(), self.csv_columns, limit=limit)

    def export_csv(self, session: Session, job_id: str, *, limit: int | None, mode: CsvMode) -> Iterator[str | bytes]:
        from selfie_jobs.queries import InterpretationFilter, interpretations_csv

        if self.table is not Interpretation:  # a kind built on this one that stores rows of its own (lenses, generate)
            return super().export_csv(session, job_id, limit=limit, mode=mode)
        return interpretations_csv(session, job_id, InterpretationFilter(), self.csv_columns, mode, limit=limit)


def _as_dict(row: Interpretation) -> dict[str, Any]:
    return {name: getattr(row, name) for name in InterpretKind.csv_columns}
