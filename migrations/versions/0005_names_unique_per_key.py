"""Prompt set and audit names are unique per key instead of across all keys: a global name let any key learn, from
a 409, that another key had used it. Every row is kept (names unique across keys are unique per key too).

The unique index is on an expression (COALESCE(owner_key_id, 0), name), which SQLAlchemy cannot reflect on SQLite:
a later batch migration that rebuilds `prompt_sets` or `audits` on SQLite must create it again (the test
`test_names_unique_per_key_keeps_every_row` upgrades to the head and checks that a name still cannot be used twice).

Revision ID: 0005_names_unique_per_key
Revises: 0004_uploads_named_like_builtins
Create Date: 2026-11-30 14:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_names_unique_per_key"
down_revision: str | None = "0004_uploads_named_like_builtins"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("prompt_sets", "audits")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(f"uq_{table}_name", type_="unique")
        # NULL owners (built-in sets, the local user without keys) never collide in a plain unique index:
        # COALESCE makes "no owner" one owner (key ids start at 1).
        op.create_index(f"uq_{table}_owner_name", table, [sa.text("COALESCE(owner_key_id, 0)"), "name"],
                        unique=True)


def downgrade() -> None:
    """Back to global names; fails (and changes nothing) if two keys now use the same name."""
    for table in TABLES:
        op.drop_index(f"uq_{table}_owner_name", table_name=table)
        with op.batch_alter_table(table) as batch_op:
            batch_op.create_unique_constraint(f"uq_{table}_name", ["name"])
