"""Model variants: where their weights live and who may see them (the job domain: no torch).

The artifact store is a directory (`Settings.variant_store_dir`, env `SELFIE_VARIANT_STORE_DIR`, default
`data_dir/variant-store`; in docker-compose a volume every worker mounts). A variant's file is
`variants/<job id>/<sha256>.safetensors`: named by its content, so an edit restarted from scratch (its worker died
after writing the file, before its row committed) writes a file of its own beside the first instead of changing a
file a stored row may already name. The row (`models.Variant`)
holds the path, relative to the store, and the SHA-256 the worker checks before it serves the variant: a file
missing or changed fails the jobs that name it with that reason; the base model is never served instead.

Variants belong to the key that made them, as jobs do: a key sees, uses and deletes its own (an admin key and
the keyless local mode see every one).
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from selfie_jobs.models import Variant

VARIANTS_DIR = "variants"
SUFFIX = ".safetensors"


class VariantUnavailable(Exception):
    """A variant's weights cannot be served: its file is missing, or its SHA-256 is not the one stored."""


def store_root(settings) -> Path:
    return settings.variant_store_dir or settings.data_dir / "variant-store"


def relative_path(job_id: str, sha256: str) -> str:
    return f"{VARIANTS_DIR}/{job_id}/{sha256}{SUFFIX}"


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


def get_visible(session: Session, variant_id: str, owner_key_id: int | None, see_all: bool) -> Variant | None:
    """The variant if the caller may see it (another key's variant is as absent as one that does not exist)."""
    variant = session.get(Variant, variant_id)
    if variant is None or (not see_all and variant.owner_key_id != owner_key_id):
        return None
    return variant


def remove_files(root: Path, job_id: str) -> None:
    """Delete every file an edit job wrote (its variant's and any left by a restarted attempt)."""
    folder = resolve(root, f"{VARIANTS_DIR}/{job_id}")
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()
