"""The text filter's index on PostgreSQL: a GIN index of each job's texts by trigram, (job_id, text
gin_trgm_ops), so that `GET /v1/jobs/{id}/interpretations?q=...` with a word few of the job's rows hold reads
those rows only instead of every row of the job (a word no row of a 100,000-row job has read all 100,000 and ran
ILIKE on each).

`q` is the only text filter of a job's rows (the results of other kinds take none), and on PostgreSQL SQLAlchemy's
`icontains` renders `text ILIKE '%' || :q || '%' ESCAPE '/'` on the column itself: pg_trgm's operator class
answers LIKE and ILIKE on the column (its trigrams are folded to lower case), so the index is on `text`, not on an
expression. It leads with job_id (btree_gin's operator class), like every index of the table: the index scan
keeps to the job's rows, so a phrase of common words that no row holds costs what the job's rows cost, not what
the table's do (a trigram index of `text` alone read, and rechecked, every row of the table that holds the
phrase's trigrams). The planner takes it for a word it estimates rare in the job and keeps the job's b-tree for a
common one; a `q` without three word characters in a row, which has no trigram to look up, never reaches it
(selfie_jobs.queries.InterpretationFilter). Plans: tests/unit/jobs/test_queries.py; what it serves and what it
costs writes: docs/architecture.md ("Result indexes"), benchmarks/README.md ("Reads at scale").

pg_trgm and btree_gin are trusted extensions: the database's owner may create them. A role that cannot makes this
migration fail with the reason and the command to run as the owner or a superuser: the filter would otherwise be
silently slow. The downgrade drops the index and leaves the extensions, which other objects of the database may
use and which cost nothing by themselves.

On SQLite this revision does nothing: SQLite has no index a `lower(text) LIKE '%...%'` can use, its scan of a
job's rows runs in the process (measured in benchmarks/README.md), and the full-text search has its FTS5 table
already (0010_lenses_search).

On PostgreSQL the index is built in the migration's transaction: writes to `interpretations` wait while it builds.

Revision ID: 0014_text_filter_index
Revises: 0013_generations
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_text_filter_index"
down_revision: str | None = "0013_generations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_interpretations_job_text_trgm"
#: pg_trgm: the trigram operator class of `text`; btree_gin: an operator class of `job_id` for a GIN index.
EXTENSIONS = {"pg_trgm": sa.text("CREATE EXTENSION pg_trgm"), "btree_gin": sa.text("CREATE EXTENSION btree_gin")}


def _create_extension(name: str) -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = :name"), {"name": name}).first():
        return
    try:
        bind.execute(EXTENSIONS[name])
    except sa.exc.DBAPIError as exc:
        raise RuntimeError(
            f"migration {revision} needs the PostgreSQL extension {name}, and this role could not create it "
            f"({exc.orig}). Run `CREATE EXTENSION {name};` in this database as its owner or a superuser (with "
            "PostgreSQL's contrib modules installed), then migrate again.") from exc


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in EXTENSIONS:
        _create_extension(name)
    op.create_index(INDEX, "interpretations", ["job_id", "text"], postgresql_using="gin",
                    postgresql_ops={"text": "gin_trgm_ops"})


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index(INDEX, table_name="interpretations")
