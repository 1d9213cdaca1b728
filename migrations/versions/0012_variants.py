"""Model edits: `variants` (an edit job's result: the edited MLP's file in the artifact store, its sha256, settings,
loss curve and evaluations; one per edit job) and `edit_epochs` (an edit's per-epoch losses and rewards, its live
progress).

Revision ID: 0012_variants
Revises: 0011_grounding
Create Date: 2026-11-30 20:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_variants"
down_revision: str | None = "0011_grounding"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "variants",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("owner_key_id", sa.Integer(), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("losses", sa.JSON(), nullable=False),
        sa.Column("evaluations", sa.JSON(), nullable=False),
        sa.Column("chunk_id", BigId, nullable=False),
        sa.Column("engine_run_id", sa.String(length=32), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_variants_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["owner_key_id"], ["api_keys.id"], name=op.f("fk_variants_owner_key_id_api_keys")),
        sa.ForeignKeyConstraint(["chunk_id"], ["chunks.id"], name=op.f("fk_variants_chunk_id_chunks"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_variants")),
        sa.UniqueConstraint("job_id", name=op.f("uq_variants_job_id")),
    )
    op.create_index(op.f("ix_variants_owner_key_id"), "variants", ["owner_key_id"])
    op.create_index(op.f("ix_variants_chunk_id"), "variants", ["chunk_id"])
    op.create_index(op.f("ix_variants_model"), "variants", ["model"])
    op.create_table(
        "edit_epochs",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("edit_loss", sa.Float(), nullable=True),
        sa.Column("keep_loss", sa.Float(), nullable=True),
        sa.Column("bad_share", sa.Float(), nullable=True),
        sa.Column("rewards", sa.JSON(), nullable=True),
        sa.Column("interpretations", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_edit_epochs_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "epoch", name=op.f("pk_edit_epochs")),
    )


def downgrade() -> None:
    op.drop_table("edit_epochs")
    op.drop_index(op.f("ix_variants_model"), table_name="variants")
    op.drop_index(op.f("ix_variants_chunk_id"), table_name="variants")
    op.drop_index(op.f("ix_variants_owner_key_id"), table_name="variants")
    op.drop_table("variants")
