"""Job kinds: each kind of work the service runs is defined in one module here (the job domain, no torch) and one
runner in `workers.runners` (the engine side). Everything else (routes, client, CLI, batcher, reconciler, quotas,
cancel, exports, the explorer) handles jobs through this registry and never names a kind.

A kind says:
- `request`: its request schema (pydantic), and `prepare`: the request validated against the model card and
  planned into work items (`PreparedJob`), with no write;
- `store_inputs` / `load_inputs` / `work_inputs`: what the worker needs besides the items (prompts, vectors), stored
  with the job and read back for a claimed chunk;
- `row_from`: what a result row holds (a dataclass with `item`, `TABLE` and `values()`); rows are written by one
  bulk INSERT .. ON CONFLICT DO NOTHING on (job, item) with the chunk marked done in the same transaction
  (`selfie_jobs.chunks.write_results`), so a redelivered chunk never duplicates a row;
- `read_page` / `export_rows` / `csv_columns`: how its results are read (pages by cursor) and exported (every row
  streamed through one database cursor).

Invariants: a kind's `batch_key` differs from every other kind's (the kind is hashed into it, except for
`interpret`, whose keys predate kinds), so cross-job batching only ever groups chunks of one kind and one engine
setting; a work item is a tuple of ints, unique within its job, and `(chunk id, *item)` is its key in an engine run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from selfie_jobs.csv_cells import CsvMode, csv_text

if TYPE_CHECKING:
    from pydantic import BaseModel
    from sqlalchemy.orm import Session

    from selfie_jobs.settings import Settings

DEFAULT_KIND = "interpret"


@dataclass
class PreparedJob:
    """A request validated against the model card and planned: what `store_job` writes, nothing yet written."""

    model: str
    spec: dict[str, Any]
    batch_key: str
    prompts: list[tuple[str, list[str]]]  # (text, decoded tokens): the prompts the job shows (none for vectors)
    items: list[list[int]]  # the kind's work items, planned into chunks of `chunk_size`
    kind: str = DEFAULT_KIND
    inputs: Any = None  # what else the kind stores with the job (vectors: their values or expressions and labels)
    quota_items: int | None = None  # what the job costs the key's daily quota, when more than its items


@dataclass(frozen=True)
class WorkInput:
    """One work item as the runner sees it: the item, a text (the prompt, or a vector's label) and a payload."""

    item: tuple[int, ...]
    text: str
    payload: Any = None


@dataclass
class ResultPage:
    rows: list[dict[str, Any]]
    next_cursor: str | None
    extra: dict[str, Any] | None = None  # what a kind gives besides its rows (an edit: its variant)


class JobKind:
    """The job-domain definition of one kind; subclasses fill every attribute and method."""

    name: ClassVar[str]
    request: ClassVar[type[BaseModel]]
    #: The result row's columns as the results route and exports give them (JSON keys and CSV columns).
    csv_columns: ClassVar[tuple[str, ...]]
    #: What one item is called in messages ("interpretations", "vectors").
    noun: ClassVar[str] = "items"
    #: The result table (an ORM class) and the columns of an item in it: with job_id, its unique key.
    table: ClassVar[type]
    item_columns: ClassVar[tuple[str, ...]]

    def prepare(self, session: Session, request: Any, settings: Settings) -> PreparedJob:
        raise NotImplementedError

    def store_inputs(self, session: Session, job_id: str, prepared: PreparedJob) -> None:
        raise NotImplementedError

    def load_inputs(self, session: Session, chunks: Sequence[Any]) -> dict[Any, Any]:
        raise NotImplementedError

    def work_inputs(self, chunk: Any, inputs: dict[Any, Any]) -> list[WorkInput]:
        raise NotImplementedError

    def row_from(self, result: Any) -> Any:
        """A storable row from an engine result whose key is ``(chunk id, *item)``."""
        raise NotImplementedError

    def describe(self, item: Sequence[int]) -> str:
        raise NotImplementedError

    def progress(self, session: Session, job: Any) -> dict[str, Any] | None:
        """The kind's own progress figures for the job's status (an edit: epochs done of the total), or None."""
        return None

    def read_page(self, session: Session, job_id: str, *, limit: int | None, cursor: str | None) -> ResultPage:
        raise NotImplementedError

    def export_rows(self, session: Session, job_id: str, *, limit: int | None) -> Iterator[Sequence[Any]]:
        """The job's rows (up to `limit`) in `read_page`'s order, each a tuple of `csv_columns`, streamed."""
        raise NotImplementedError

    def export_csv(self, session: Session, job_id: str, *, limit: int | None, mode: CsvMode) -> Iterator[str | bytes]:
        """The job's rows (up to `limit`) as a CSV file in pieces, the header first: `export_rows` through csv_text
        unless the kind has a faster way to the same bytes."""
        return csv_text(self.csv_columns, self.export_rows(session, job_id, limit=limit), mode)


@dataclass
class _Registry:
    kinds: dict[str, JobKind] = field(default_factory=dict)

    def load(self) -> dict[str, JobKind]:
        # Imported on first use, not at import of this package: the kind modules import the models and the queries.
        if not self.kinds:
            from selfie_jobs.kinds.edits import ReinforceKind, SupervisedKind
            from selfie_jobs.kinds.generate import GenerateKind
            from selfie_jobs.kinds.interpret import InterpretKind
            from selfie_jobs.kinds.lenses import LensesKind
            from selfie_jobs.kinds.vectors import VectorsKind

            for kind in (InterpretKind(), VectorsKind(), LensesKind(), GenerateKind(), SupervisedKind(),
                         ReinforceKind()):
                self.kinds[kind.name] = kind
        return self.kinds


_REGISTRY = _Registry()


def all_kinds() -> dict[str, JobKind]:
    return dict(_REGISTRY.load())


def get_kind(name: str | None) -> JobKind:
    kinds = _REGISTRY.load()
    try:
        return kinds[name or DEFAULT_KIND]
    except KeyError:
        raise LookupError(f"unknown job kind {name!r}; known: {', '.join(sorted(kinds))}") from None


def kind_of_request(request: Any) -> JobKind:
    """The kind whose request schema is the request's class or its nearest base (a kind's schema may extend
    another's: `LensJobCreate` is a `JobCreate` with lens options)."""
    mro = type(request).__mro__
    takers = [kind for kind in _REGISTRY.load().values() if kind.request in mro]
    if not takers:
        raise LookupError(f"no job kind takes a {type(request).__name__}")
    return min(takers, key=lambda kind: mro.index(kind.request))


def item_tuple(values: Iterable[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


__all__ = ["DEFAULT_KIND", "JobKind", "PreparedJob", "ResultPage", "WorkInput", "all_kinds", "get_kind",
           "item_tuple", "kind_of_request"]
