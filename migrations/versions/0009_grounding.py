"""Grounding: each interpretation job's baseline (the interpretation prompt's own output, nothing injected) and
each interpretation's grounded judgement with its reason when it is not grounded.

Rows stored before have no judgement (NULL): they were not judged, which is not the same as grounded.

Revision ID: 0009_grounding
Revises: 0008_result_indexes
Create Date: 2026-11-30 17:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_grounding"
down_revision: str | None = "0008_result_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("baseline", sa.JSON(), nullable=True))
    with op.batch_alter_table("interpretations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("grounded", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("ungrounded_reason", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("interpretations", schema=None) as batch_op:
        batch_op.drop_column("ungrounded_reason")
        batch_op.drop_column("grounded")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("baseline")
