"""Grounding: each interpretation job's baseline (the interpretation prompt's own output, nothing injected) and
each interpretation's grounded judgement with its reason when it is not grounded.

Rows stored before have no judgement (NULL): they were not judged, which is not the same as grounded.

Revision ID: 0011_grounding
Revises: 0010_lenses_search
Create Date: 2026-11-30 17:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_grounding"
down_revision: str | None = "0010_lenses_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE .. ADD/DROP COLUMN on both databases (SQLite has both since 3.35), never a batch-mode copy
    # of the table: a copy of interpretations on SQLite would drop the full-text search triggers (0010).
    op.add_column("jobs", sa.Column("baseline", sa.JSON(), nullable=True))
    op.add_column("interpretations", sa.Column("grounded", sa.Boolean(), nullable=True))
    op.add_column("interpretations", sa.Column("ungrounded_reason", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("interpretations", "ungrounded_reason")
    op.drop_column("interpretations", "grounded")
    op.drop_column("jobs", "baseline")
