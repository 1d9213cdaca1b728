"""Compact result rows and retention.

The relevancy lists of `interpretations` and `vector_interpretations` become little-endian float32 bytes
(selfie_jobs.float_arrays) instead of JSON text; every stored row is converted, in batches of BATCH_ROWS rows so
that a large table is never read into memory at once, and back on downgrade.
Retention: `api_keys.job_ttl_seconds` (the default for a key's jobs) and `jobs.ttl_seconds` (a job's own), both
NULL for the rows already stored, which therefore keep the settings' default (selfie_jobs.retention).

Revision ID: 0007_compact_rows
Revises: 0006_job_kinds
Create Date: 2026-11-30 17:30:00
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from selfie_jobs.float_arrays import pack_floats, unpack_floats

revision: str = "0007_compact_rows"
down_revision: str | None = "0006_job_kinds"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESULT_TABLES = ("interpretations", "vector_interpretations")
#: Rows converted per read and per UPDATE batch: about 5 MB of JSON text at most in memory.
BATCH_ROWS = 5_000


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_ttl_seconds", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ttl_seconds", sa.Integer(), nullable=True))
    for table in RESULT_TABLES:
        _convert(table, old_type=sa.JSON(), new_type=sa.LargeBinary(), convert=pack_floats)


def downgrade() -> None:
    for table in RESULT_TABLES:
        _convert(table, old_type=sa.LargeBinary(), new_type=sa.JSON(), convert=unpack_floats)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("ttl_seconds")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("job_ttl_seconds")


def _convert(table: str, *, old_type: sa.types.TypeEngine, new_type: sa.types.TypeEngine,
             convert: Callable[[Any], Any]) -> None:
    """`table.relevancy` from `old_type` to `new_type`: a new column filled batch by batch in id order, then the old
    one dropped and the new one renamed and made NOT NULL (SQLite copies the table once, in batch mode)."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.add_column(sa.Column("relevancy_new", new_type, nullable=True))
    rows = sa.table(table, sa.column("id", sa.Integer()), sa.column("relevancy", old_type),
                    sa.column("relevancy_new", new_type))
    fill = (sa.update(rows).where(rows.c.id == sa.bindparam("row_id"))
            .values(relevancy_new=sa.bindparam("value", type_=new_type)))
    conn = op.get_bind()
    last = None
    while True:
        query = sa.select(rows.c.id, rows.c.relevancy).order_by(rows.c.id).limit(BATCH_ROWS)
        if last is not None:
            query = query.where(rows.c.id > last)
        batch = conn.execute(query).all()
        if not batch:
            break
        conn.execute(fill, [{"row_id": row_id, "value": convert(value)} for row_id, value in batch])
        last = batch[-1][0]
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.drop_column("relevancy")
        batch_op.alter_column("relevancy_new", new_column_name="relevancy", existing_type=new_type, nullable=False)
