"""Rows for tests, inserted directly (what a submission writes): a job, its prompts and its chunks."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from selfie_jobs.models import Chunk, Job, Prompt

SPEC = {
    "template": {"parts": ["[INST]", 0, 0, "[/INST] Sure:"]},
    "injection": {"k": 1, "mode": "replace", "strength": 1.0},
    "generation": {"max_new_tokens": 3, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": None},
}


def make_job(
    session: Session,
    *,
    model: str = "tiny",
    prompts: tuple[str, ...] = ("the cat sat on the mat",),
    items: list[tuple[int, int, int]] | None = None,
    chunk_size: int = 4,
    batch_key: str = "bk1",
    priority: int = 5,
    spec: dict | None = None,
    enqueued_at: datetime | None = None,
    created_at: datetime | None = None,
    deadline_at: datetime | None = None,
) -> Job:
    items = items if items is not None else [(0, layer, token) for layer in range(2) for token in range(4)]
    job = Job(model=model, priority=priority, spec=spec or SPEC, batch_key=batch_key, total=len(items),
              deadline_at=deadline_at)
    if created_at is not None:
        job.created_at = created_at
    session.add(job)
    session.flush()
    for i, text in enumerate(prompts):
        session.add(Prompt(job_id=job.id, index=i, text=text, tokens=text.split()))
    for n, start in enumerate(range(0, len(items), chunk_size)):
        part = [list(x) for x in items[start : start + chunk_size]]
        session.add(Chunk(job_id=job.id, index=n, model=model, batch_key=batch_key, priority=priority, items=part,
                          size=len(part), enqueued_at=enqueued_at))
    session.flush()
    return job


def make_variant(session: Session, root, data: bytes | None = None, *, edit=None, model: str = "tiny",
                 owner_key_id: int | None = None, layer: int = 1, method: str = "supervised",
                 created_at: datetime | None = None):
    """A finished edit job (its one chunk done) and the variant it stored in the artifact store at `root`: `edit` (a
    `selfie_core.weights.MLPEdit`, saved by `workers.variants.save_edit` as an edit job saves it) or `data` (any
    bytes, for tests that never load them)."""
    from selfie_jobs.models import Variant, utcnow
    from selfie_jobs.variants import write_artifact

    now = created_at or utcnow()
    job = Job(model=model, kind=method, state="succeeded", priority=5, spec={"layer": layer}, batch_key="edit",
              total=1, done=1, owner_key_id=owner_key_id, created_at=now, finished_at=now)
    session.add(job)
    session.flush()
    chunk = Chunk(job_id=job.id, index=0, model=model, batch_key="edit", priority=5, items=[[0]], size=1,
                  state="done", finished_at=now)
    session.add(chunk)
    session.flush()
    if edit is not None:
        from workers.variants import save_edit

        path, sha = save_edit(root, job.id, edit)
        layer = edit.layer
    else:
        path, sha = write_artifact(root, job.id, data or b"")
    variant = Variant(job_id=job.id, owner_key_id=owner_key_id, method=method, layer=layer, path=path, sha256=sha,
                      settings={"epochs": 2, "lr": 3e-4}, losses=[{"epoch": 0, "loss": 1.0, "edit_loss": 1.0,
                                                                  "keep_loss": None, "bad_share": None}],
                      evaluations={}, chunk_id=chunk.id, engine_run_id="test", worker="test", model=model,
                      created_at=now)
    session.add(variant)
    session.flush()
    return variant
