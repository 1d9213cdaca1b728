"""Reports of audit runs: flags per layer and per token position, top findings, the diff against the previous run,
and a streamed CSV export. Everything is computed in SQL (GROUP BY, LIMIT), so a large run costs no memory here.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from selfie_jobs.csv_cells import CsvMode, csv_row
from selfie_jobs.audit_models import AuditFinding, AuditRun, AuditRunState, PromptSetItem
from selfie_jobs.models import Prompt

CONTEXT_TOKENS = 4
CSV_COLUMNS = ("run_id", "job_id", "item_index", "prompt_index", "layer", "token", "token_from_end", "source_token",
               "detector", "label", "match", "mean_relevancy", "text", "prompt")


def previous_run(session: Session, run: AuditRun) -> AuditRun | None:
    """The latest succeeded run of the same audit before this one."""
    return session.scalars(
        select(AuditRun)
        .where(AuditRun.audit_id == run.audit_id, AuditRun.id < run.id, AuditRun.state == AuditRunState.SUCCEEDED)
        .order_by(AuditRun.id.desc())
        .limit(1)
    ).first()


def _group(session: Session, run_id: int, column) -> list[dict[str, Any]]:
    rows = session.execute(
        select(column, func.count(), func.count(func.distinct(AuditFinding.item_index)))
        .where(AuditFinding.run_id == run_id)
        .group_by(column)
        .order_by(column)
    ).all()
    return [{"key": key, "flags": int(n), "prompts": int(p)} for key, n, p in rows]


def _context(tokens: list[str] | None, token: int, width: int = CONTEXT_TOKENS) -> dict[str, Any]:
    tokens = tokens or []
    return {
        "before": "".join(tokens[max(0, token - width) : token]),
        "token": tokens[token] if 0 <= token < len(tokens) else "",
        "after": "".join(tokens[token + 1 : token + 1 + width]),
    }


def finding_dict(f: AuditFinding, prompt: str | None = None, tokens: list[str] | None = None) -> dict[str, Any]:
    out = {
        "id": f.id, "run_id": f.run_id, "job_id": f.job_id, "item_index": f.item_index, "prompt_index": f.prompt_index,
        "layer": f.layer, "token": f.token, "token_from_end": f.token_from_end, "source_token": f.source_token,
        "detector": f.detector, "label": f.label, "match": f.match, "text": f.text,
        "mean_relevancy": f.mean_relevancy, "fingerprint": f.fingerprint,
    }
    if prompt is not None:
        out["prompt"] = prompt
        out["context"] = _context(tokens, f.token)
    return out


def top_findings(session: Session, run_id: int, limit: int = 20, *, detector: str | None = None,
                 layer: int | None = None) -> list[dict[str, Any]]:
    """The most relevant flagged interpretations, each with its prompt and the tokens around its position."""
    q = (
        select(AuditFinding, Prompt.text, Prompt.tokens)
        .join(Prompt, and_(Prompt.job_id == AuditFinding.job_id, Prompt.index == AuditFinding.prompt_index))
        .where(AuditFinding.run_id == run_id)
        .order_by(AuditFinding.mean_relevancy.desc(), AuditFinding.id)
        .limit(limit)
    )
    if detector is not None:
        q = q.where(AuditFinding.detector == detector)
    if layer is not None:
        q = q.where(AuditFinding.layer == layer)
    return [finding_dict(f, text, tokens) for f, text, tokens in session.execute(q)]


def diff(session: Session, run: AuditRun, previous: AuditRun | None, limit: int = 20) -> dict[str, Any]:
    """Findings new in `run` and gone since `previous`, matched by fingerprint (prompt, layer, token, detector, label)."""
    if previous is None:
        return {"previous_run_id": None, "new": None, "gone": None, "new_count": None, "gone_count": None}

    def only_in(a_id: int, b_id: int):
        other = aliased(AuditFinding)
        exists_in_b = select(other.id).where(other.run_id == b_id, other.fingerprint == AuditFinding.fingerprint).exists()
        return AuditFinding.run_id == a_id, ~exists_in_b

    out: dict[str, Any] = {"previous_run_id": previous.id}
    for name, (a, b) in {"new": (run.id, previous.id), "gone": (previous.id, run.id)}.items():
        where = only_in(a, b)
        out[f"{name}_count"] = int(session.scalar(select(func.count()).select_from(AuditFinding).where(*where)) or 0)
        rows = session.scalars(
            select(AuditFinding).where(*where).order_by(AuditFinding.mean_relevancy.desc(), AuditFinding.id).limit(limit)
        ).all()
        out[name] = [finding_dict(f) for f in rows]
    return out


def run_report(session: Session, run: AuditRun, *, top: int = 20) -> dict[str, Any]:
    by_detector = session.execute(
        select(AuditFinding.detector, AuditFinding.label, func.count())
        .where(AuditFinding.run_id == run.id)
        .group_by(AuditFinding.detector, AuditFinding.label)
        .order_by(func.count().desc())
    ).all()
    flagged_prompts = session.scalar(
        select(func.count(func.distinct(AuditFinding.item_index))).where(AuditFinding.run_id == run.id)
    )
    return {
        "run_id": run.id,
        "audit_id": run.audit_id,
        "state": run.state,
        "flags": run.flags,
        "flagged_prompts": int(flagged_prompts or 0),
        "by_layer": _group(session, run.id, AuditFinding.layer),
        "by_token": _group(session, run.id, AuditFinding.token),
        "by_token_from_end": _group(session, run.id, AuditFinding.token_from_end),
        "by_label": [{"detector": d, "label": lbl, "flags": int(n)} for d, lbl, n in by_detector],
        "top": top_findings(session, run.id, top),
        "diff": diff(session, run, previous_run(session, run), limit=top),
    }


def iter_findings_csv(session: Session, run_id: int, page: int = 2_000, mode: CsvMode = "safe") -> Iterator[str]:
    """The run's findings as CSV text pieces (header first), read in keyset pages: bounded memory. `mode`: see
    `selfie_jobs.csv_cells` (safe for spreadsheets, or raw)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    yield buf.getvalue()
    last_id = 0
    while True:
        rows = session.execute(
            select(AuditFinding, Prompt.text)
            .join(Prompt, and_(Prompt.job_id == AuditFinding.job_id, Prompt.index == AuditFinding.prompt_index))
            .where(AuditFinding.run_id == run_id, AuditFinding.id > last_id)
            .order_by(AuditFinding.id)
            .limit(page)
        ).all()
        if not rows:
            return
        buf.seek(0)
        buf.truncate()
        for f, prompt in rows:
            writer.writerow(csv_row([f.run_id, f.job_id, f.item_index, f.prompt_index, f.layer, f.token,
                                     f.token_from_end, f.source_token, f.detector, f.label, f.match,
                                     f"{f.mean_relevancy:.6f}", f.text, prompt], mode))
        last_id = rows[-1][0].id
        session.expunge_all()
        yield buf.getvalue()


def item_meta(session: Session, prompt_set_id: int, item_index: int) -> dict[str, Any]:
    row = session.scalar(
        select(PromptSetItem.meta).where(PromptSetItem.prompt_set_id == prompt_set_id, PromptSetItem.index == item_index)
    )
    return row or {}
