"""Result indexes chosen from the measured queries: one index leading with job_id per sort order of a job's
interpretations, so that every page (first or deep, by keyset cursor) and every filter reads the job's rows only;
the engine-run indexes, which no query uses, are dropped. What each index serves, with the measured query:
docs/architecture.md ("Result indexes"); figures: benchmarks/README.md ("Reads at scale").

On PostgreSQL the new indexes are built in the migration's transaction: writes to `interpretations` wait while
they build (measured on 10,000,000 rows in benchmarks/README.md).

Revision ID: 0008_result_indexes
Revises: 0007_compact_rows
Create Date: 2026-11-30 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008_result_indexes"
down_revision: str | None = "0007_compact_rows"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_INDEXES = {
    "ix_interpretations_job_layer": ["job_id", "layer", "prompt_index", "token"],
    "ix_interpretations_job_token": ["job_id", "prompt_index", "token", "layer"],
    "ix_interpretations_job_created": ["job_id", "created_at", "id"],
}


def upgrade() -> None:
    op.drop_index("ix_interpretations_engine_run_id", table_name="interpretations")
    op.drop_index("ix_vector_interpretations_engine_run_id", table_name="vector_interpretations")
    # Equal relevancies are ordered by id: with it in the index, sort=relevancy and -relevancy read it as it is.
    op.drop_index("ix_interpretations_job_relevancy", table_name="interpretations")
    op.create_index("ix_interpretations_job_relevancy", "interpretations", ["job_id", "mean_relevancy", "id"])
    for name, columns in NEW_INDEXES.items():
        op.create_index(name, "interpretations", columns)


def downgrade() -> None:
    for name in NEW_INDEXES:
        op.drop_index(name, table_name="interpretations")
    op.drop_index("ix_interpretations_job_relevancy", table_name="interpretations")
    op.create_index("ix_interpretations_job_relevancy", "interpretations", ["job_id", "mean_relevancy"])
    op.create_index("ix_vector_interpretations_engine_run_id", "vector_interpretations", ["engine_run_id"])
    op.create_index("ix_interpretations_engine_run_id", "interpretations", ["engine_run_id"])
