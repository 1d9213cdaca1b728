"""Uploaded prompt sets named like a built-in set are renamed: names are global, and such an upload stood in for the
built-in in every key's audits (another key could then not use the built-in at all). Uploads can no longer take
these names; the rename gives the built-in its name back. Audits refer to prompt sets by id and are unaffected.

Revision ID: 0004_uploads_named_like_builtins
Revises: 0003_job_request_hash
Create Date: 2026-11-27 20:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_uploads_named_like_builtins"
down_revision: str | None = "0003_job_request_hash"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The built-in names when this revision was written (a migration does not follow later code).
BUILTIN_NAMES = ("ethical_decisions", "prompt_injections", "harmful_knowledge")


def upgrade() -> None:
    prompt_sets = sa.table("prompt_sets", sa.column("id", sa.Integer), sa.column("name", sa.String),
                           sa.column("source", sa.String))
    conn = op.get_bind()
    taken = conn.execute(
        sa.select(prompt_sets.c.id, prompt_sets.c.name)
        .where(prompt_sets.c.name.in_(BUILTIN_NAMES), prompt_sets.c.source != "builtin")
    ).all()
    for set_id, name in taken:
        conn.execute(sa.update(prompt_sets).where(prompt_sets.c.id == set_id)
                     .values(name=f"{name} (upload {set_id})"))


def downgrade() -> None:
    """Nothing to undo: the renamed uploads keep working under their new names."""
