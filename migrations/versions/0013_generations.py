"""The generate kind's results (generations): one prompt's continuation per row, unique per (job, prompt_index).

Revision ID: 0013_generations
Revises: 0012_variants
Create Date: 2026-11-30 21:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_generations"
down_revision: str | None = "0012_variants"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("id", BigId, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("prompt_index", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("finish", sa.String(length=16), nullable=False),
        sa.Column("chunk_id", BigId, nullable=False),
        sa.Column("engine_run_id", sa.String(length=32), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["chunk_id"], ["chunks.id"], name=op.f("fk_generations_chunk_id_chunks"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_generations_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generations")),
        sa.UniqueConstraint("job_id", "prompt_index", name=op.f("uq_generations_job_id_prompt_index")),
    )
    op.create_index(op.f("ix_generations_chunk_id"), "generations", ["chunk_id"])
    op.create_index(op.f("ix_generations_engine_run_id"), "generations", ["engine_run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_generations_engine_run_id"), table_name="generations")
    op.drop_index(op.f("ix_generations_chunk_id"), table_name="generations")
    op.drop_table("generations")
