"""jobs.kind: every job says what kind of work it is (selfie_jobs.kinds); every existing job is an interpretation.
The vectors kind's tables: its inputs (job_vectors) and results (vector_interpretations).

Revision ID: 0006_job_kinds
Revises: 0005_names_unique_per_key
Create Date: 2026-11-30 14:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_job_kinds"
down_revision: str | None = "0005_names_unique_per_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NOT NULL with a server default: the rows already stored get 'interpret' as the column is added, so no row is
    # rewritten by hand and none is lost (batch mode copies the table on SQLite, keeping every row).
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=32), nullable=False, server_default="interpret"))

    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "job_vectors",
        sa.Column("id", big_id, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("vector", sa.JSON(), nullable=True),
        sa.Column("expression", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_vectors_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_vectors")),
        sa.UniqueConstraint("job_id", "index", name=op.f("uq_job_vectors_job_id_index")),
    )
    op.create_table(
        "vector_interpretations",
        sa.Column("id", big_id, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("vector_index", sa.Integer(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("relevancy", sa.JSON(), nullable=False),
        sa.Column("mean_relevancy", sa.Float(), nullable=False),
        sa.Column("chunk_id", big_id, nullable=False),
        sa.Column("engine_run_id", sa.String(length=32), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["chunk_id"], ["chunks.id"], name=op.f("fk_vector_interpretations_chunk_id_chunks"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_vector_interpretations_job_id_jobs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vector_interpretations")),
        sa.UniqueConstraint("job_id", "vector_index", name=op.f("uq_vector_interpretations_job_id_vector_index")),
    )
    with op.batch_alter_table("vector_interpretations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vector_interpretations_chunk_id"), ["chunk_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_vector_interpretations_engine_run_id"), ["engine_run_id"], unique=False)


def downgrade() -> None:
    op.drop_table("vector_interpretations")
    op.drop_table("job_vectors")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("kind")
