"""SQLAlchemy models of audits: prompt sets, audits, their runs, the jobs of a run, and the findings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func, text
from sqlalchemy.orm import Mapped, mapped_column

from selfie_jobs.models import Base, BigId, utcnow


class AuditRunState:
    PENDING = "pending"  # created, fan-out not started (or waiting for a control worker)
    SUBMITTING = "submitting"  # jobs being created; resumable from `prompts_submitted`
    RUNNING = "running"  # every job submitted; waiting for jobs to finish and be scanned
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_RUN_STATES = frozenset({AuditRunState.SUCCEEDED, AuditRunState.FAILED, AuditRunState.CANCELLED})
OPEN_RUN_STATES = frozenset({AuditRunState.PENDING, AuditRunState.SUBMITTING, AuditRunState.RUNNING})


class PromptSet(Base):
    """A named list of prompts: uploaded (JSONL/CSV) or one of the examples shipped with the project."""

    __tablename__ = "prompt_sets"
    # Names are unique per key, not across keys: a global name would tell another key, by a 409, that it exists.
    # Built-in sets and the local user's (no key) have no owner: NULLs never collide in a unique index, so the
    # index is on COALESCE(owner_key_id, 0) (key ids start at 1), which makes "no owner" one owner of its own.
    __table_args__ = (Index("uq_prompt_sets_owner_name", func.coalesce(text("owner_key_id"), 0), "name", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(32), default="upload")  # upload | builtin
    size: Mapped[int] = mapped_column(Integer, default=0)
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PromptSetItem(Base):
    __tablename__ = "prompt_set_items"
    __table_args__ = (UniqueConstraint("prompt_set_id", "index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    prompt_set_id: Mapped[int] = mapped_column(ForeignKey("prompt_sets.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    # Anything else a row carried (category, id, expected behaviour): kept and shown with findings.
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Audit(Base):
    """What to run: a model over a prompt set, which hidden states, the engine spec, detectors, a schedule."""

    __tablename__ = "audits"
    # per key, as prompt set names
    __table_args__ = (Index("uq_audits_owner_name", func.coalesce(text("owner_key_id"), 0), "name", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    prompt_set_id: Mapped[int] = mapped_column(ForeignKey("prompt_sets.id"), index=True)
    # {"layers": "all" | [..] | {"start","stop","step"}, "tokens": "all" | {"last": n} | [..]}
    targets: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Job options besides prompts and targets (template, k, injection, max_new_tokens, decoding, priority).
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    detectors: Mapped[list[Any]] = mapped_column(JSON)
    schedule: Mapped[str | None] = mapped_column(String(120), nullable=True)  # cron expression (UTC)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    next_run_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditRun(Base):
    __tablename__ = "audit_runs"
    __table_args__ = (Index("ix_audit_runs_audit_id_id", "audit_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    audit_id: Mapped[int] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), default=AuditRunState.PENDING, index=True)
    trigger: Mapped[str] = mapped_column(String(16), default="manual")  # manual | schedule
    # The audit as it was when the run started (targets, options, detectors, model, prompt set).
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompts_total: Mapped[int] = mapped_column(Integer, default=0)
    # Fan-out cursor: prompt set items [0, prompts_submitted) are in jobs; a restarted fan-out resumes here.
    prompts_submitted: Mapped[int] = mapped_column(Integer, default=0)
    # Prompts the model cannot take (too long for its context): left out of the run, counted here.
    prompts_skipped: Mapped[int] = mapped_column(Integer, default=0)
    jobs_total: Mapped[int] = mapped_column(Integer, default=0)
    jobs_scanned: Mapped[int] = mapped_column(Integer, default=0)
    interpretations_scanned: Mapped[int] = mapped_column(BigId, default=0)
    flags: Mapped[int] = mapped_column(Integer, default=0)
    # Who is fanning out and until when: another driver may take over once the lease has expired.
    owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class AuditRunJob(Base):
    """One job of a run: which slice of the prompt set it holds, and whether its results were scanned."""

    __tablename__ = "audit_run_jobs"
    __table_args__ = (UniqueConstraint("run_id", "batch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("audit_runs.id", ondelete="CASCADE"), index=True)
    batch: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    prompt_offset: Mapped[int] = mapped_column(Integer)  # prompt set index of the job's prompt 0
    prompt_count: Mapped[int] = mapped_column(Integer)
    scanned: Mapped[bool] = mapped_column(Boolean, default=False)
    flags: Mapped[int] = mapped_column(Integer, default=0)


class AuditFinding(Base):
    """A flagged interpretation: one detector hit at (prompt, layer, token) of one run."""

    __tablename__ = "audit_findings"
    __table_args__ = (
        UniqueConstraint("run_id", "job_id", "prompt_index", "layer", "token", "detector", "label",
                         name="uq_audit_findings_hit"),  # the generated name is past PostgreSQL's 63 characters
        Index("ix_audit_findings_run_id_relevancy", "run_id", "mean_relevancy"),
        Index("ix_audit_findings_run_id_fingerprint", "run_id", "fingerprint"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("audit_runs.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(32))
    prompt_index: Mapped[int] = mapped_column(Integer)  # within the job
    item_index: Mapped[int] = mapped_column(Integer)  # within the prompt set
    layer: Mapped[int] = mapped_column(Integer)
    token: Mapped[int] = mapped_column(Integer)
    token_from_end: Mapped[int] = mapped_column(Integer)  # -1 = the prompt's last token
    source_token: Mapped[str] = mapped_column(Text)
    detector: Mapped[str] = mapped_column(String(200))
    label: Mapped[str] = mapped_column(String(500))
    match: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    mean_relevancy: Mapped[float] = mapped_column(Float)
    # Same finding across runs: hash of (prompt text, layer, token, detector, label) -> the diff new/gone.
    fingerprint: Mapped[str] = mapped_column(String(64))
