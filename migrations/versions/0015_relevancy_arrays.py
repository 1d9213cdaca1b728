"""Relevancy lists as PostgreSQL's own float4 arrays (`real[]`) instead of little-endian float32 bytes (BYTEA).

The values stay float32, bit for bit (selfie_jobs.float_arrays says why float32). What changes is that the server
can read them: a whole job's CSV export is written by PostgreSQL itself (COPY .. TO STDOUT, selfie_jobs.csv_copy),
which writes each list as text from the array, and a BYTEA is bytes it cannot read as numbers. A row grows by the
array's header, 20 bytes (101 bytes for 20 values against 81; benchmarks/README.md "Stored rows").

Every stored row is converted by the server, in one rewrite of each table (ALTER COLUMN TYPE .. USING): each
4-byte little-endian word is decoded into its float32 by arithmetic on its bits (sign, exponent, mantissa, with
subnormals), exact in float8 and then in float4. The bytes are what the service wrote: whole 4-byte words of
finite values (writes refuse the others); a NaN or an infinity put there by hand makes the conversion fail
("value out of range"), and bytes past the last whole word would be dropped. It converts about 45,000 rows a
second here, under the ALTER's exclusive lock on each table. The downgrade writes the bytes back from float4send
(big-endian, hence the byte reversal), as migration 0007 did.

On SQLite this revision does nothing: the lists stay float32 bytes in a BLOB.

Revision ID: 0015_relevancy_arrays
Revises: 0014_text_filter_index
Create Date: 2026-12-01 04:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0015_relevancy_arrays"
down_revision: str | None = "0014_text_filter_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESULT_TABLES = ("interpretations", "vector_interpretations")

# Little-endian float32 bytes -> real[]. A word's bits: sign (bit 31), exponent (bits 23-30), mantissa (0-22);
# exponent 0 is a subnormal (mantissa * 2^-149), otherwise (2^23 + mantissa) * 2^(exponent - 150). Stored lists
# hold finite values only (selfie_jobs.float_arrays refuses the others), so exponent 255 never occurs.
_TO_ARRAY = """
CREATE FUNCTION pg_temp.selfie_float32le_array(b bytea) RETURNS real[] LANGUAGE sql IMMUTABLE STRICT AS $$
  SELECT coalesce(array_agg(
           ((CASE WHEN w >= 2147483648 THEN -1 ELSE 1 END)
            * CASE WHEN (w >> 23) & 255 = 0 THEN (w & 8388607) * power(2::float8, -149)
                   ELSE ((w & 8388607) + 8388608) * power(2::float8, ((w >> 23) & 255) - 150) END)::real
           ORDER BY i), '{}'::real[])
  FROM (SELECT i, get_byte(b, 4 * i)::bigint | (get_byte(b, 4 * i + 1)::bigint << 8)
                  | (get_byte(b, 4 * i + 2)::bigint << 16) | (get_byte(b, 4 * i + 3)::bigint << 24) AS w
        FROM generate_series(0, length(b) / 4 - 1) AS i) AS words
$$
"""

_TO_BYTES = """
CREATE FUNCTION pg_temp.selfie_array_float32le(a real[]) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT AS $$
  SELECT coalesce(string_agg(substring(b from 4 for 1) || substring(b from 3 for 1) || substring(b from 2 for 1)
                             || substring(b from 1 for 1), ''::bytea ORDER BY o), ''::bytea)
  FROM (SELECT float4send(v) AS b, o FROM unnest(a) WITH ORDINALITY AS e(v, o)) AS s
$$
"""


def upgrade() -> None:
    _retype("real[]", _TO_ARRAY, "pg_temp.selfie_float32le_array(bytea)")


def downgrade() -> None:
    _retype("bytea", _TO_BYTES, "pg_temp.selfie_array_float32le(real[])")


def _retype(new_type: str, create_function: str, function: str) -> None:
    """Every table's relevancy column to `new_type` through the conversion `function` (created for this, dropped
    after), on PostgreSQL only."""
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(create_function)
    name = function.split("(")[0]
    for table in RESULT_TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN relevancy TYPE {new_type} USING {name}(relevancy)")
    op.execute(f"DROP FUNCTION {function}")
