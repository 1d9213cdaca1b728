"""API keys: random secrets shown once, stored as SHA-256 hashes, found by their prefix, revocable.

A key has 256 bits of entropy, so a plain SHA-256 is enough to make the stored hash useless to a reader of the
database (no password-style stretching needed); the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from selfie_jobs.ids import INT_MAX, parse_id
from selfie_jobs.models import ApiKey, utcnow

KEY_MARK = "sk-selfie-"
PREFIX_LEN = 16  # the mark plus 6 random characters: shown in listings, indexed for lookup


@dataclass(frozen=True)
class Principal:
    """Who is asking: a key id (None when auth is off) and whether it sees every job."""

    key_id: int | None
    is_admin: bool
    name: str = ""

    def can_see(self, owner_key_id: int | None) -> bool:
        return self.is_admin or (self.key_id is not None and owner_key_id == self.key_id)


LOCAL_PRINCIPAL = Principal(key_id=None, is_admin=True, name="local (auth off)")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, name: str, *, admin: bool = False, daily_quota: int | None = None,
               job_ttl_seconds: int | None = None) -> tuple[ApiKey, str]:
    """Store a new key and return (row, secret). The secret is not stored and cannot be shown again."""
    secret = KEY_MARK + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        prefix=secret[:PREFIX_LEN],
        key_hash=hash_key(secret),
        is_admin=admin,
        daily_quota=daily_quota,
        job_ttl_seconds=job_ttl_seconds,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, secret


def authenticate(session: Session, secret: str) -> ApiKey | None:
    """The live key for `secret`, or None."""
    if not secret.startswith(KEY_MARK) or len(secret) < PREFIX_LEN + 8 or len(secret) > 200:
        return None
    digest = hash_key(secret)
    rows = session.scalars(
        select(ApiKey).where(ApiKey.prefix == secret[:PREFIX_LEN], ApiKey.revoked_at.is_(None))
    ).all()
    for row in rows:
        if hmac.compare_digest(row.key_hash, digest):
            return row
    return None


def list_keys(session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query).all())


def find_key(session: Session, id_or_prefix: str | int) -> ApiKey | None:
    """A key by numeric id or by prefix (as shown in listings), or None; ValueError when a prefix matches several."""
    key_id = id_or_prefix if isinstance(id_or_prefix, int) else parse_id(str(id_or_prefix))
    if key_id is not None:
        return session.get(ApiKey, key_id) if 0 < key_id <= INT_MAX else None
    matches = session.scalars(select(ApiKey).where(ApiKey.prefix == str(id_or_prefix)[:PREFIX_LEN])).all()
    if len(matches) > 1:
        raise ValueError(f"prefix {id_or_prefix!r} matches {len(matches)} keys; name the key by id")
    return matches[0] if matches else None


def revoke_key(session: Session, id_or_prefix: str | int) -> ApiKey | None:
    """Revoke by numeric id or by prefix (as shown in listings); returns the row, or None if nothing matched."""
    row = find_key(session, id_or_prefix)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def key_revoked(session: Session, key_id: int | None) -> bool:
    """Whether work owned by `key_id` may no longer run: its key was revoked (or deleted). No key: the local user."""
    if key_id is None:
        return False
    row = session.get(ApiKey, key_id)
    return row is None or row.revoked_at is not None
