"""Compact result rows and retention.

The relevancy lists of `interpretations` and `vector_interpretations` become little-endian float32 bytes
(selfie_jobs.float_arrays) instead of JSON text, and every stored row is converted: on PostgreSQL by the server,
in one rewrite of each table; on SQLite in batches of BATCH_ROWS rows, so that a large table is never read into
memory at once. The downgrade converts back in such batches on both.
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
    if op.get_bind().dialect.name == "postgresql":
        _to_float32_in_postgres()
    else:
        for table in RESULT_TABLES:
            _convert(table, old_type=sa.JSON(), new_type=sa.LargeBinary(), convert=pack_floats)


def downgrade() -> None:
    for table in RESULT_TABLES:
        _convert(table, old_type=sa.LargeBinary(), new_type=sa.JSON(), convert=unpack_floats)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("ttl_seconds")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("job_ttl_seconds")


# JSON array -> little-endian float32 bytes, in the server. float4send writes big-endian, hence the byte reversal;
# the value goes through float8 as the Python path's does (float32 of the double), so both give the same bytes.
_FLOAT32_LE = """
CREATE FUNCTION pg_temp.selfie_float32le(j json) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT AS $$
  SELECT coalesce(string_agg(substring(b from 4 for 1) || substring(b from 3 for 1) || substring(b from 2 for 1)
                             || substring(b from 1 for 1), ''::bytea ORDER BY o), ''::bytea)
  FROM (SELECT float4send(v::float8::float4) AS b, o FROM json_array_elements_text(j) WITH ORDINALITY AS e(v, o)) s
$$
"""


def _to_float32_in_postgres() -> None:
    """One rewrite of each table by the server (ALTER COLUMN TYPE .. USING), streamed row by row: nothing is held
    in memory, no row is left behind as a dead version, and the JSON text is gone from the pages (a dropped column
    keeps its bytes in every row until the table is next rewritten: measured in benchmarks/row_size.py)."""
    op.execute(_FLOAT32_LE)
    for table in RESULT_TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN relevancy TYPE bytea USING pg_temp.selfie_float32le(relevancy)")
    op.execute("DROP FUNCTION pg_temp.selfie_float32le(json)")


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
