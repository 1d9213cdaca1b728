"""jobs.request_hash: the hash of the normalized request, so a replayed idempotency key with another body is refused

Revision ID: 0003_job_request_hash
Revises: 0002_audits
Create Date: 2026-11-27 10:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_job_request_hash"
down_revision: str | None = "0002_audits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("request_hash")
