"""Audit request schemas: what a client may define (targets, engine options, detector configs, schedule).

Detector configs are checked by building them with `selfie_jobs.audit_detectors`, the registry the workers scan
with: the API accepts exactly the configs a worker can build.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from croniter import CroniterBadDateError, croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfie_jobs import audit_detectors
from selfie_jobs.prompt_sets import BUILTIN
from selfie_jobs.specs import Bool, EngineOptions, Float, Index, IndexRange, Int


class LastTokens(BaseModel):
    model_config = ConfigDict(extra="forbid")
    last: Annotated[Int, Field(ge=1, le=1_000)]


class AuditTargets(BaseModel):
    """Layers as for jobs; tokens: all, the last n of each prompt, or chosen indices (negative from the end)."""

    model_config = ConfigDict(extra="forbid")
    layers: Literal["all"] | Annotated[list[Index], Field(min_length=1, max_length=1_000)] | IndexRange = "all"
    tokens: Literal["all"] | LastTokens | Annotated[list[Index], Field(min_length=1, max_length=1_000)] = Field(
        default_factory=lambda: LastTokens(last=1)
    )


class DetectorSpec(BaseModel):
    """A detector config (see `selfie_jobs.audit_detectors`): kind, name, min_relevancy and the kind's own fields."""

    model_config = ConfigDict(extra="allow")
    kind: str
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    min_relevancy: Float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("kind")
    @classmethod
    def _known(cls, value: str) -> str:
        known = audit_detectors.kinds()
        if value not in known:
            raise ValueError(f"unknown detector kind {value!r}; known: {', '.join(known)}")
        return value

    def checked(self) -> dict[str, Any]:
        """The config as stored, once the registry's factory has built it (a `DetectorConfigError`, which is a
        ValueError, says what to change)."""
        data = self.model_dump(exclude_none=True)
        data.setdefault("name", self.kind)
        audit_detectors.build(data)
        return data


class AuditOptions(EngineOptions):
    """Options of the audit's jobs: the engine options of POST /v1/jobs (the same schema, the same defaults), and a
    priority below interactive jobs'. An audit stores its options with every default written out, so an audit
    stored before the schemas were one keeps the defaults it was made with (max_new_tokens 20)."""

    priority: Annotated[Int, Field(ge=0, le=9)] = 3


def _check_detectors(value: list[DetectorSpec]) -> list[DetectorSpec]:
    names = [d.name or d.kind for d in value]
    if len(set(names)) != len(names):
        raise ValueError("detector names must be unique (name them)")
    for d in value:
        d.checked()
    return value


def validate_cron(expr: str) -> str:
    fields = expr.split()
    # croniter also reads a sixth field (seconds) and a seventh (year): a schedule here is the five fields cron
    # has, and no number in them needs more than two digits (a step of 20 digits parses and means nothing)
    if len(fields) != 5 or any(len(number) > 2 for number in re.findall(r"\d+", expr)) or not croniter.is_valid(expr):
        raise ValueError(f"invalid cron expression {expr!r} (five fields: minute hour day month weekday)")
    try:  # an expression can parse and never fire (30 February): the scheduler could not compute its next run
        croniter(expr, datetime.now(timezone.utc)).get_next(datetime)
    except (CroniterBadDateError, ValueError, OverflowError):
        raise ValueError(f"cron expression {expr!r} never fires (no such date)") from None
    return expr


class AuditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Annotated[str, Field(min_length=1, max_length=200)]
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    prompt_set: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="Name of an uploaded prompt set or of a built-in one: " + ", ".join(BUILTIN)
    )
    targets: AuditTargets = Field(default_factory=AuditTargets)
    options: AuditOptions = Field(default_factory=AuditOptions)
    detectors: Annotated[list[DetectorSpec], Field(min_length=1, max_length=50)]
    schedule: Annotated[str, Field(max_length=120)] | None = Field(None, description="cron, UTC; null: manual only")
    enabled: Bool = True

    _detectors = field_validator("detectors")(_check_detectors)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return validate_cron(value) if value else None


class AuditUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    targets: AuditTargets | None = None
    options: AuditOptions | None = None
    detectors: Annotated[list[DetectorSpec], Field(min_length=1, max_length=50)] | None = None
    schedule: Annotated[str, Field(max_length=120)] | None = None
    enabled: Bool | None = None

    @field_validator("detectors")
    @classmethod
    def _dets(cls, value):
        return _check_detectors(value) if value is not None else value

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return validate_cron(value) if value else value
