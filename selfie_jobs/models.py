"""SQLAlchemy models: the database is the source of truth for jobs, their work units and their results."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from selfie_jobs.float_arrays import Float32List
from selfie_jobs.states import ChunkState, JobState

# Explicit constraint names so Alembic migrations are identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; BigInteger elsewhere for tables that grow without bound.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # First characters of the key, shown in listings and used to find the row before the hash comparison.
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    daily_quota: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # How long its finished jobs are kept, in seconds, when a job does not say (None: the settings' default).
    job_ttl_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ServedModel(Base):
    """A model card, written by workers when they load a model: what the API validates requests against."""

    __tablename__ = "served_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    architecture: Mapped[str] = mapped_column(String(100))
    num_layers: Mapped[int] = mapped_column(Integer)
    hidden_size: Mapped[int] = mapped_column(Integer)
    max_context: Mapped[int] = mapped_column(Integer)
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tokenizer_json: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Worker(Base):
    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32), default="starting")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(default=utcnow)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    # What kind of work (selfie_jobs.kinds): decides the request schema, the inputs, the result table and runner.
    kind: Mapped[str] = mapped_column(String(32), default="interpret", server_default="interpret")
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    # "<owner>:<client key>": unique, so a retried submit returns the first job instead of making a second one.
    idempotency_scope: Mapped[str | None] = mapped_column(String(300), unique=True, nullable=True)
    # SHA-256 of the normalized request: a replayed idempotency key with another request is refused (409).
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Engine settings (template, injection, generation) as JSON, and their hash: chunks with the same
    # batch_key can share one engine batch.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    batch_key: Mapped[str] = mapped_column(String(64))
    # The interpretation prompt's own output, nothing injected ({"text", "token_ids"}), written by the worker
    # before the job's first results; what an interpretation that is not grounded may merely repeat.
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    audit_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Seconds the job is kept after it finished, as its request asked (None: its key's, then the settings' default;
    # selfie_jobs.retention).
    ttl_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)

    prompts: Mapped[list[Prompt]] = relationship(back_populates="job", order_by="Prompt.index")


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    # Decoded tokens as the tokenizer returns them: the columns of the layer x token grid.
    tokens: Mapped[list[Any]] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="prompts")


class Chunk(Base):
    """The unit of work and of progress: a bounded list of (prompt index, layer, token) of one job."""

    __tablename__ = "chunks"
    __table_args__ = (
        UniqueConstraint("job_id", "index"),
        Index("ix_chunks_claim", "model", "state", "priority", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    batch_key: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=5)
    state: Mapped[str] = mapped_column(String(16), default=ChunkState.QUEUED)
    # The job kind's items: [[prompt_index, layer, token], ...] for interpret, [[vector_index], ...] for vectors.
    items: Mapped[list[Any]] = mapped_column(JSON)
    size: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class EngineRun(Base):
    """One engine batch run by a worker; it may serve chunks of several jobs (cross-job batching)."""

    __tablename__ = "engine_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    worker: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)
    chunk_ids: Mapped[list[Any]] = mapped_column(JSON)
    job_ids: Mapped[list[Any]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    elapsed_s: Mapped[float] = mapped_column(Float)


class Interpretation(Base):
    """Every index leads with job_id: a results query reads its job's rows only, from its cursor on, in the order of
    one index per sort (selfie_jobs.queries._SORTS; what each serves, measured: docs/architecture.md, "Result
    indexes")."""

    __tablename__ = "interpretations"
    __table_args__ = (
        # A redelivered chunk can never duplicate a result; also sort=position, the filters on prompt, and the
        # text filter's scan of the job's rows.
        UniqueConstraint("job_id", "prompt_index", "layer", "token"),
        Index("ix_interpretations_job_layer", "job_id", "layer", "prompt_index", "token"),  # sort=layer, -layer
        Index("ix_interpretations_job_token", "job_id", "prompt_index", "token", "layer"),  # sort=token
        Index("ix_interpretations_job_relevancy", "job_id", "mean_relevancy", "id"),  # sort=relevancy, -relevancy
        Index("ix_interpretations_job_created", "job_id", "created_at", "id"),  # sort=created
        # The text filter `q` (ILIKE) with a word few of the job's rows hold: a GIN index of the job's texts by
        # trigram, on PostgreSQL only (pg_trgm and btree_gin, migration 0014).
        Index("ix_interpretations_job_text_trgm", "job_id", "text", postgresql_using="gin",
              postgresql_ops={"text": "gin_trgm_ops"}).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    prompt_index: Mapped[int] = mapped_column(Integer)
    layer: Mapped[int] = mapped_column(Integer)
    token: Mapped[int] = mapped_column(Integer)
    source_token: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[Any]] = mapped_column(JSON)
    # float32 bytes, read and written as a list of floats (selfie_jobs.float_arrays says why float32)
    relevancy: Mapped[list[float]] = mapped_column(Float32List)
    mean_relevancy: Mapped[float] = mapped_column(Float)
    # selfie_core.grounding: NULL for rows stored before interpretations were judged
    grounded: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    ungrounded_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Indexed for the foreign key: deleting chunks finds their rows by it (ON DELETE CASCADE).
    chunk_id: Mapped[int] = mapped_column(BigId, ForeignKey("chunks.id", ondelete="CASCADE"), index=True)
    engine_run_id: Mapped[str] = mapped_column(String(32))
    worker: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobVector(Base):
    """An input of a `vectors` job: a vector as submitted (`vector`), or an expression over hidden states
    (`expression`: {"terms": [{"coef", "prompt", "layer", "token"}, ...]}) that the worker extracts and sums."""

    __tablename__ = "job_vectors"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(Text)
    vector: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    expression: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class VectorInterpretation(Base):
    """A result of a `vectors` job: what the model says about one submitted vector."""

    __tablename__ = "vector_interpretations"
    __table_args__ = (
        # A redelivered chunk can never duplicate a result.
        UniqueConstraint("job_id", "vector_index"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    vector_index: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(Text)
    norm: Mapped[float] = mapped_column(Float)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[Any]] = mapped_column(JSON)
    # float32 bytes, read and written as a list of floats (selfie_jobs.float_arrays says why float32)
    relevancy: Mapped[list[float]] = mapped_column(Float32List)
    mean_relevancy: Mapped[float] = mapped_column(Float)
    # Indexed for the foreign key: deleting chunks finds their rows by it (ON DELETE CASCADE).
    chunk_id: Mapped[int] = mapped_column(BigId, ForeignKey("chunks.id", ondelete="CASCADE"), index=True)
    engine_run_id: Mapped[str] = mapped_column(String(32))
    worker: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LensReading(Base):
    """A result of a `lenses` job: one (prompt, layer, token) state read by the logit lens and the identity patch,
    each scored against the model's own next-token prediction there. A lens the job did not ask for is null."""

    __tablename__ = "lens_readings"
    __table_args__ = (
        # A redelivered chunk can never duplicate a result.
        UniqueConstraint("job_id", "prompt_index", "layer", "token"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    prompt_index: Mapped[int] = mapped_column(Integer)
    layer: Mapped[int] = mapped_column(Integer)
    token: Mapped[int] = mapped_column(Integer)
    source_token: Mapped[str] = mapped_column(Text)
    # top-k token ids, their decoded text and probabilities, best first
    model_token_ids: Mapped[list[Any]] = mapped_column(JSON)
    model_tokens: Mapped[list[Any]] = mapped_column(JSON)
    model_probs: Mapped[list[Any]] = mapped_column(JSON)
    logit_token_ids: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    logit_tokens: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    logit_probs: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    # whether the lens's top-1 is the model's top-1, and the probability the lens gives the model's top-1
    logit_matches: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    logit_model_prob: Mapped[float | None] = mapped_column(Float, nullable=True)
    identity_token_ids: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    identity_tokens: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    identity_probs: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    identity_matches: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    identity_model_prob: Mapped[float | None] = mapped_column(Float, nullable=True)
    chunk_id: Mapped[int] = mapped_column(BigId, ForeignKey("chunks.id", ondelete="CASCADE"), index=True)
    engine_run_id: Mapped[str] = mapped_column(String(32), index=True)
    worker: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Generation(Base):
    """A result of a `generate` job: the model's continuation of one prompt (in its chat format or raw), greedy or
    sampled, and why it ended ("eos": the model ended it; "length": max_new_tokens was reached)."""

    __tablename__ = "generations"
    __table_args__ = (
        # A redelivered chunk can never duplicate a result.
        UniqueConstraint("job_id", "prompt_index"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    prompt_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[Any]] = mapped_column(JSON)  # the generated ids, the ending EOS included
    finish: Mapped[str] = mapped_column(String(16))
    chunk_id: Mapped[int] = mapped_column(BigId, ForeignKey("chunks.id", ondelete="CASCADE"), index=True)
    engine_run_id: Mapped[str] = mapped_column(String(32), index=True)
    worker: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Variant(Base):
    """A model variant: one decoder block's MLP as an edit job (`supervised`, `reinforce`) left it, kept as a
    safetensors file in the artifact store (`selfie_jobs.variants`), with what made it and how it did.

    It is the edit job's result row: written with the job's one chunk marked done in the same transaction, unique
    per job, so a redelivered or restarted edit stores exactly one variant. Owned, like jobs, by the key that made
    it (`owner_key_id`); `model` is the base model it edits."""

    __tablename__ = "variants"
    __table_args__ = (
        # A restarted edit can never store a second variant.
        UniqueConstraint("job_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    method: Mapped[str] = mapped_column(String(16))  # the edit kind: supervised or reinforce
    # The hidden-state layer the edit changes: the MLP of decoder block layer - 1 is replaced.
    layer: Mapped[int] = mapped_column(Integer)
    # The edited module's weights: a path relative to the artifact store, and the file's SHA-256, checked before use.
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    # The edit's settings as run (defaults filled in), its per-epoch figures and its evaluations (base vs variant).
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    losses: Mapped[list[Any]] = mapped_column(JSON)
    evaluations: Mapped[dict[str, Any]] = mapped_column(JSON)
    chunk_id: Mapped[int] = mapped_column(BigId, ForeignKey("chunks.id", ondelete="CASCADE"), index=True)
    engine_run_id: Mapped[str] = mapped_column(String(32))
    worker: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EditEpoch(Base):
    """One epoch of an edit job as it trains: the job's live progress (losses, rewards), written as the epoch ends.

    Keyed by (job, epoch) and upserted: an edit restarted from scratch (its worker died) writes its epochs again."""

    __tablename__ = "edit_epochs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: not finite
    edit_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    keep_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    # reinforce: the judge's rewards (+1/-1/0 per position), the share judged bad and the interpretations judged
    bad_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    rewards: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    interpretations: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# Audit tables live in their own module; imported here so Base.metadata (migrations, tests) always holds them.
from selfie_jobs import audit_models as _audit_models  # noqa: E402,F401
