"""Audit request schemas: what a client may define (targets, engine options, detector configs, schedule).

Detector configs are checked by shape here (the API never imports the engine); `selfie_core.detectors` builds
them in the worker. `KNOWN_DETECTOR_KINDS` must list the core registry's kinds (a test compares them).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from croniter import CroniterBadDateError, croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfie_jobs.prompt_sets import BUILTIN
from selfie_jobs.specs import Bool, Decoding, Float, Index, IndexRange, Int, Template

#: Detector kinds the core registry ships (checked against `selfie_core.detectors.kinds()` by a test).
KNOWN_DETECTOR_KINDS = ("concepts", "keywords", "regex")
_REQUIRED_FIELD = {"keywords": "words", "regex": "patterns", "concepts": "concepts"}
# selfie_core.detectors' limits, checked here too so that the API refuses what a worker could not build
# (tests/unit/audits/test_detectors.py runs the same bad configs through both)
MAX_TERMS = 5_000
MAX_TERM_CHARS = 500


def _check_terms(where: str, terms: Any) -> None:
    if not isinstance(terms, list) or not terms:
        raise ValueError(f"{where} must be a non-empty list")
    if len(terms) > MAX_TERMS:
        raise ValueError(f"{where} holds at most {MAX_TERMS} entries")
    for term in terms:
        if not isinstance(term, str) or not term.strip():
            raise ValueError(f"every entry of {where} must be a non-empty string")
        if len(term) > MAX_TERM_CHARS:
            raise ValueError(f"entries of {where} are at most {MAX_TERM_CHARS} characters")


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
    """A detector config (see selfie_core.detectors): kind, name, min_relevancy and the kind's own fields."""

    model_config = ConfigDict(extra="allow")
    kind: str
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    min_relevancy: Float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("kind")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in KNOWN_DETECTOR_KINDS:
            raise ValueError(f"unknown detector kind {value!r}; known: {', '.join(KNOWN_DETECTOR_KINDS)}")
        return value

    def checked(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True)
        need = _REQUIRED_FIELD.get(self.kind)
        if need is None:  # a kind of its own: its factory checks its config when a worker builds it
            data.setdefault("name", self.kind)
            return data
        value = data.get(need)
        if self.kind == "concepts" and isinstance(value, dict) and value:
            for concept, terms in value.items():  # a term alone stands for a list; no terms: the concept's name
                _check_terms(f"concept {concept!r}", [terms] if isinstance(terms, str) else
                             [concept] if terms == [] else terms)
        else:
            _check_terms(f"a {self.kind} detector's '{need}'", value)
        if self.kind == "regex":
            for pattern in value:
                try:
                    re.compile(str(pattern))
                except re.error as exc:
                    raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        data.setdefault("name", self.kind)
        return data


class AuditOptions(BaseModel):
    """Engine options of the audit's jobs (as in POST /v1/jobs)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    template: Template | None = None
    k: Annotated[Int, Field(ge=0, le=10_000)] = 1
    injection_mode: Literal["replace", "blend", "add"] = "replace"
    injection_strength: Float = Field(1.0, ge=0.0, le=100.0)
    max_new_tokens: Annotated[Int, Field(ge=1, le=100_000)] = 20
    decoding: Decoding = Field(default_factory=Decoding)
    priority: Annotated[Int, Field(ge=0, le=9)] = 3

    @field_validator("template", mode="before")
    @classmethod
    def _preset_shorthand(cls, value: Any) -> Any:
        return {"preset": value} if isinstance(value, str) else value


def _check_detectors(value: list[DetectorSpec]) -> list[DetectorSpec]:
    names = [d.name or d.kind for d in value]
    if len(set(names)) != len(names):
        raise ValueError("detector names must be unique (name them)")
    for d in value:
        d.checked()
    return value


def validate_cron(expr: str) -> str:
    if not croniter.is_valid(expr):
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
