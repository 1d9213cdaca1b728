"""Response schemas (requests are `selfie_jobs.specs.JobCreate`). ORM rows never leave the api as they are."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from selfie_jobs.chunks import as_utc

# SQLite returns naive datetimes (stored as UTC): always answer with an explicit UTC offset.
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


class Links(BaseModel):
    self: str
    interpretations: str | None  # an interpret job's only; None for another kind (its rows are at `results`)
    results: str  # every kind's results (the interpretations of an interpret job, the rows of a vectors job)
    cancel: str
    page: str  # the results explorer: the layer x token grid, or the table of a vectors job


class ErrorOut(BaseModel):
    detail: str
    field: str | None = None


class JobAccepted(BaseModel):
    id: str
    kind: str = Field("interpret", description="The job kind: interpret or vectors.")
    state: str
    model: str
    total: int = Field(description="Results the job will produce (interpretations, or interpreted vectors).")
    chunks: int
    enqueued: int = Field(description="Chunks sent to the queue by this call (0 for a repeated idempotency key).")
    created: bool = Field(description="False when an earlier job with the same idempotency key is returned.")
    link: str
    links: Links


class Progress(BaseModel):
    done: int = Field(description="Results stored: finished interpretations (interpreted vectors for a vectors job).")
    total: int = Field(description="Results the job will produce.")
    fraction: float = Field(description="done / total (1.0 for an empty job).")
    in_flight: int = Field(0, description="The job's rows in engine batches that live workers are decoding now; "
                           "not counted in `done` until their batch ends and they are stored.")
    decode_step: int | None = Field(None, description="Decode step the furthest of those batches has reached ...")
    decode_steps: int | None = Field(None, description="... of this many (max_new_tokens; a batch whose rows all "
                                     "end early finishes sooner). None when none of the job's rows are decoding.")
    rows_per_second: float | None = Field(None, description="The job's share of the measured rate of the workers "
                                          "running it: results per second over their last engine batches, writes "
                                          "included (before a worker's first batch ends: estimated from its decode "
                                          "steps). None when nothing of the job runs now.")
    eta_seconds: float | None = Field(None, description="Seconds until the job is done at that rate: (total - done - "
                                      "in_flight x decode_step / decode_steps) / rows_per_second. None when no rate "
                                      "is known (the job waits in the queue, or is final).")


class Timings(BaseModel):
    created_at: UtcDatetime | None
    started_at: UtcDatetime | None = Field(description="When a worker first took one of the job's chunks.")
    finished_at: UtcDatetime | None
    queued_seconds: float | None = Field(description="From submit to started_at (or to now, while queued).")
    running_seconds: float | None = Field(description="From started_at to finished_at (or to now, while running).")
    total_seconds: float | None


class PromptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    text: str
    tokens: list[str]


class Baseline(BaseModel):
    text: str
    token_ids: list[int]


class JobStatus(BaseModel):
    id: str
    kind: str = "interpret"
    model: str
    state: str = Field(description="queued, running (as soon as a worker runs any of its chunks), succeeded, failed "
                       "or cancelled.")
    priority: int
    progress: Progress
    chunks: dict[str, int]
    queue_position: int | None = Field(description="Queued chunks of the same model served before this job's next one.")
    items_ahead: int | None = Field(description="Interpretations in those chunks.")
    waiting: str | None = Field(None, description="Why the job's queued chunks are not being served now: its model "
                                "is loading, failed to load, or has no live worker. None when a worker is ready.")
    timings: Timings
    error: str | None
    spec: dict[str, Any]
    ttl_seconds: int | None = Field(None, description="Seconds the job is kept after it finished, as its request "
                                    "asked; None: its key's, else the service's default (docs/api.md, Retention).")
    baseline: Baseline | None = Field(None, description=(
        "The interpretation prompt's own output with nothing injected; None until the worker has computed it "
        "(and for jobs stored before baselines)."))
    prompts: list[PromptOut]
    edit: dict[str, int] | None = Field(None, description="Edit jobs: epochs_done (epochs trained and stored) of "
                                        "epochs_total.")
    link: str
    links: Links


class JobSummary(BaseModel):
    id: str
    kind: str = "interpret"
    model: str
    state: str
    priority: int
    done: int
    total: int
    created_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    error: str | None
    link: str


class JobList(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None


class CancelOut(BaseModel):
    id: str
    state: str
    cancelled: bool = Field(description="False when the job had already finished.")


class InterpretationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    prompt_index: int
    layer: int
    token: int
    source_token: str
    text: str
    mean_relevancy: float
    grounded: bool | None = Field(description=(
        "Whether the text is grounded in the injected state; None for rows stored before it was judged."))
    ungrounded_reason: Literal["baseline", "repetition", "empty", "low_relevancy"] | None = Field(description=(
        "Why not: equal to the job's baseline, degenerate repetition, no letter or digit, or mean relevancy under "
        "the job's grounding.min_mean_relevancy (selfie_core.grounding)."))
    relevancy: list[float]
    token_ids: list[int]
    worker: str
    model: str
    created_at: UtcDatetime | None


class InterpretationList(BaseModel):
    job_id: str
    state: str
    items: list[InterpretationOut]
    next_cursor: str | None


class ResultList(BaseModel):
    """A page of any kind's results; `items` hold the kind's columns (`columns`), as its CSV export does."""

    job_id: str
    kind: str
    state: str
    columns: list[str]
    items: list[dict[str, Any]]
    next_cursor: str | None
    variant: dict[str, Any] | None = Field(None, description="Edit jobs (supervised, reinforce): the variant the job "
                                           "stored (none until it finishes); `items` are its epochs.")


class WorkerOut(BaseModel):
    name: str
    device: str
    devices: list[str] = Field(default_factory=list, description="Every device the worker computes on (several "
                               "for a model spread over GPUs).")
    state: str
    last_heartbeat: UtcDatetime | None


class ModelOut(BaseModel):
    name: str
    architecture: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    max_context: int | None = None
    presets: list[str] = Field(default_factory=list)
    workers: list[WorkerOut]
    card: dict[str, Any] = Field(default_factory=dict, description="Everything else the worker reports.")


class ModelList(BaseModel):
    models: list[ModelOut]


class Tokenized(BaseModel):
    model: str
    ids: list[int]
    tokens: list[str]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    database: str
    redis: str


class VariantSummary(BaseModel):
    id: str
    job_id: str = Field(description="The edit job that made the variant.")
    model: str = Field(description="The base model it edits: jobs that name the variant must be of this model.")
    method: str = Field(description="The edit: supervised or reinforce.")
    layer: int = Field(description="The hidden-state layer the edit changes (the MLP of block layer - 1 is replaced).")
    created_at: UtcDatetime | None
    link: str
    page: str = Field(description="The variant's page: loss curve, base model against variant, benchmarks.")


class VariantList(BaseModel):
    variants: list[VariantSummary]
    next_cursor: str | None


class VariantOut(VariantSummary):
    sha256: str = Field(description="The SHA-256 of the weights file, checked by the worker before it serves it.")
    settings: dict[str, Any] = Field(description="The edit's settings as it ran (defaults filled in).")
    losses: list[Any] = Field(description="Per epoch: {epoch, loss, edit_loss, keep_loss, bad_share} (null where "
                              "not finite or not applicable).")
    evaluations: dict[str, Any] = Field(description="Base model against variant: objective, interpretation, "
                                        "answer, knowledge, behaviour (each absent when not asked for).")
    job_link: str


class VariantDeleted(BaseModel):
    id: str
    deleted: bool
