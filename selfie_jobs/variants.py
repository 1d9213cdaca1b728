"""Model variants: where their weights live and who may see them (the job domain: no torch).

The artifact store is a directory (`Settings.variant_store_dir`, env `SELFIE_VARIANT_STORE_DIR`, default
`data_dir/variant-store`; in docker-compose a volume every worker and the API mount). A variant's file is
`variants/<job id>/<sha256>.safetensors`: named by its content, so an edit restarted from scratch (its worker died
after writing the file, before its row committed) writes a file of its own beside the first instead of changing a
file a stored row may already name. The row (`models.Variant`) holds the path, relative to the store, and the
SHA-256 the worker checks before it serves the variant: a file missing or changed fails the jobs that name it with
that reason; the base model is never served instead.

Variants belong to the key that made them, as jobs do: a key sees, uses and deletes its own (an admin key and
the keyless local mode see every one). A job that names a variant (`variant` in its request) is refused unless
its caller may see the variant and the variant edits the job's model (`check_usable`); the variant's id goes into
the job's spec, so into its batch key. The files of a variant go with it: when it is deleted (`delete_variant`)
and when its edit job is purged (`selfie_jobs.retention`; the row goes by ON DELETE CASCADE).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from sqlalchemy import delete, select, tuple_
from sqlalchemy.orm import Session

from selfie_jobs.errors import SubmissionError
from selfie_jobs.models import Variant

VARIANTS_DIR = "variants"
SUFFIX = ".safetensors"


class VariantUnavailable(Exception):
    """A variant's weights cannot be served: its file is missing, or its SHA-256 is not the one stored."""


def store_root(settings) -> Path:
    return settings.variant_store_dir or settings.data_dir / "variant-store"


def _plain_name(name: str, what: str) -> str:
    """A name that is one path component of its own: not empty, no separator, not ``.`` or ``..`` (which would
    name the store's variants folder itself, or a folder above it)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"{what} {name!r} cannot name a file in the artifact store")
    return name


def relative_path(job_id: str, sha256: str) -> str:
    return f"{VARIANTS_DIR}/{_plain_name(job_id, 'job id')}/{_plain_name(sha256, 'sha256')}{SUFFIX}"


def resolve(root: Path, relative: str) -> Path:
    """The file of a stored relative path, refusing one that leaves the store (an absolute path, or ``..``)."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.parts[0] != VARIANTS_DIR:
        raise VariantUnavailable(f"the variant's path {relative!r} is not in the artifact store")
    return Path(root).joinpath(*rel.parts)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(root: Path, job_id: str, data: bytes) -> tuple[str, str]:
    """Store a variant's file (safetensors bytes) and return (relative path, sha256). Written to a temporary name
    and renamed, so a reader never sees half a file; writing the same bytes again is a no-op."""
    sha = hashlib.sha256(data).hexdigest()
    relative = relative_path(job_id, sha)
    path = resolve(root, relative)
    if path.exists() and file_sha256(path) == sha:
        return relative, sha
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{sha[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
    tmp.replace(path)
    return relative, sha


def verified_file(root: Path, relative: str, sha256: str) -> Path:
    """The variant's file, checked against its stored SHA-256; `VariantUnavailable` says what is wrong."""
    path = resolve(root, relative)
    if not path.is_file():
        raise VariantUnavailable(f"the variant's weights file is missing from the artifact store ({relative})")
    got = file_sha256(path)
    if got != sha256:
        raise VariantUnavailable(f"the variant's weights file is corrupted: its sha256 is {got}, "
                                 f"the variant was stored with {sha256}")
    return path


def visible_variants(owner_key_id: int | None, see_all: bool):
    """A SELECT of the variants a caller may see: its own, or every one for an admin or the keyless local mode."""
    stmt = select(Variant)
    if not see_all:
        stmt = stmt.where(Variant.owner_key_id == owner_key_id)
    return stmt


def list_variants(session: Session, owner_key_id: int | None, see_all: bool, *, limit: int = 50,
                  cursor: str | None = None) -> tuple[list[Variant], str | None]:
    """The variants a caller may see, newest first, in keyset pages as job listings are (the cursor after the last
    one when more follow)."""
    from selfie_jobs.queries import decode_cursor, encode_cursor

    query = visible_variants(owner_key_id, see_all)
    if cursor:
        created_at, variant_id = decode_cursor(cursor, "variants", [datetime, str])
        query = query.where(tuple_(Variant.created_at, Variant.id) < (created_at, variant_id))
    rows = list(session.scalars(query.order_by(Variant.created_at.desc(), Variant.id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor("variants", [rows[-1].created_at.isoformat(), rows[-1].id])


def get_visible(session: Session, variant_id: str, owner_key_id: int | None, see_all: bool) -> Variant | None:
    """The variant if the caller may see it (another key's variant is as absent as one that does not exist)."""
    variant = session.get(Variant, variant_id)
    if variant is None or (not see_all and variant.owner_key_id != owner_key_id):
        return None
    return variant


@dataclass(frozen=True)
class VariantRef:
    """What a worker needs to serve a variant, read from its row (plain values: no ORM object leaves the claim)."""

    id: str
    model: str
    layer: int
    path: str
    sha256: str


def variant_refs(session: Session, variant_ids: Iterable[str]) -> dict[str, VariantRef]:
    """The rows of the variants that exist among `variant_ids` (a deleted one is absent)."""
    wanted = sorted(set(variant_ids))
    if not wanted:
        return {}
    rows = session.execute(select(Variant.id, Variant.model, Variant.layer, Variant.path, Variant.sha256)
                           .where(Variant.id.in_(wanted)))
    return {row.id: VariantRef(row.id, row.model, int(row.layer), row.path, row.sha256) for row in rows}


def check_usable(session: Session, variant_id: str, model: str, owner_key_id: int | None,
                 see_all: bool) -> Variant:
    """The variant a job names, refused unless the caller may see it (another key's variant is as absent as one that
    does not exist: 404) and it edits the job's model (422). Nothing is written."""
    variant = get_visible(session, variant_id, owner_key_id, see_all)
    if variant is None:
        raise SubmissionError(f"no such variant {variant_id!r}", field="variant", status=404)
    if variant.model != model:
        raise SubmissionError(f"variant {variant_id!r} edits model {variant.model!r}, not {model!r}: submit the job "
                              f"to {variant.model!r} (or leave the variant out)", field="variant")
    return variant


def remove_files(root: Path, job_id: str) -> None:
    """Delete every file an edit job wrote (its variant's and any left by a restarted attempt); nothing when it wrote
    none. Only the job's own folder is touched (`job_id` is one path component)."""
    folder = resolve(root, f"{VARIANTS_DIR}/{_plain_name(job_id, 'job id')}")
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()


def delete_variant(session: Session, variant: Variant, root: Path) -> bool:
    """Delete a variant, committed: its row by a conditional DELETE, then, once that has committed, its files. Of
    concurrent deletes of one variant exactly one removes the row (the others find none: False, nothing done), and
    only that one removes the files. A job that names it afterwards is refused at submission, and one queued before
    fails in the worker, which finds the row gone. Files left by a crash between the commit and their removal are
    an edit job's folder without a row, as retention leaves none (it removes them the same way)."""
    variant_id, job_id = variant.id, variant.job_id
    removed = session.execute(delete(Variant).where(Variant.id == variant_id)).rowcount
    if removed != 1:
        session.rollback()
        return False
    session.commit()
    remove_files(root, job_id)
    return True
