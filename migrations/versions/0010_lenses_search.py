"""The lenses kind's results (lens_readings), and full-text search over the result texts: on PostgreSQL a stored generated
column search_vector = to_tsvector('simple', text) with a GIN index; on SQLite an FTS5 table per result table, external content (the text
is stored once, in the result table), kept in sync by triggers, so the rows and their index are written by the same
transaction. Existing rows are indexed here.

Revision ID: 0010_lenses_search
Revises: 0008_result_indexes
Create Date: 2026-11-30 17:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_lenses_search"
down_revision: str | None = "0008_result_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: result table -> its text column searched (selfie_jobs.search.SOURCES reads the same tables)
SEARCHED = ("interpretations", "vector_interpretations")


def _create_search(table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        # 'simple': no stemming and no stop words, as SQLite's unicode61 tokenizer, so both databases match alike.
        # A stored column, not an expression index: a plan that walks the rows newest first and filters them (the
        # planner's choice for a common word) reads the vector instead of parsing every text again (11 us a row).
        op.execute(f"ALTER TABLE {table} ADD COLUMN search_vector tsvector "
                   "GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, text)) STORED")
        op.execute(f"CREATE INDEX ix_{table}_text_search ON {table} USING gin (search_vector)")
        return
    fts = f"{table}_fts"
    op.execute(f"CREATE VIRTUAL TABLE {fts} USING fts5(text, content='{table}', content_rowid='id', "
               "tokenize='unicode61 remove_diacritics 0')")
    op.execute(f"CREATE TRIGGER {fts}_insert AFTER INSERT ON {table} BEGIN "
               f"INSERT INTO {fts}(rowid, text) VALUES (new.id, new.text); END")
    op.execute(f"CREATE TRIGGER {fts}_delete AFTER DELETE ON {table} BEGIN "
               f"INSERT INTO {fts}({fts}, rowid, text) VALUES ('delete', old.id, old.text); END")
    op.execute(f"CREATE TRIGGER {fts}_update AFTER UPDATE OF text ON {table} BEGIN "
               f"INSERT INTO {fts}({fts}, rowid, text) VALUES ('delete', old.id, old.text); "
               f"INSERT INTO {fts}(rowid, text) VALUES (new.id, new.text); END")
    op.execute(f"INSERT INTO {fts}({fts}) VALUES ('rebuild')")


def _drop_search(table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS ix_{table}_text_search")
        op.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS search_vector")
        return
    for trigger in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER IF EXISTS {table}_fts_{trigger}")
    op.execute(f"DROP TABLE IF EXISTS {table}_fts")


def upgrade() -> None:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "lens_readings",
        sa.Column("id", big_id, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("prompt_index", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("source_token", sa.Text(), nullable=False),
        sa.Column("model_token_ids", sa.JSON(), nullable=False),
        sa.Column("model_tokens", sa.JSON(), nullable=False),
        sa.Column("model_probs", sa.JSON(), nullable=False),
        sa.Column("logit_token_ids", sa.JSON(), nullable=True),
        sa.Column("logit_tokens", sa.JSON(), nullable=True),
        sa.Column("logit_probs", sa.JSON(), nullable=True),
        sa.Column("logit_matches", sa.Boolean(), nullable=True),
        sa.Column("logit_model_prob", sa.Float(), nullable=True),
        sa.Column("identity_token_ids", sa.JSON(), nullable=True),
        sa.Column("identity_tokens", sa.JSON(), nullable=True),
        sa.Column("identity_probs", sa.JSON(), nullable=True),
        sa.Column("identity_matches", sa.Boolean(), nullable=True),
        sa.Column("identity_model_prob", sa.Float(), nullable=True),
        sa.Column("chunk_id", big_id, nullable=False),
        sa.Column("engine_run_id", sa.String(length=32), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["chunk_id"], ["chunks.id"], name=op.f("fk_lens_readings_chunk_id_chunks"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_lens_readings_job_id_jobs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lens_readings")),
        sa.UniqueConstraint("job_id", "prompt_index", "layer", "token",
                            name=op.f("uq_lens_readings_job_id_prompt_index_layer_token")),
    )
    with op.batch_alter_table("lens_readings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lens_readings_chunk_id"), ["chunk_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_lens_readings_engine_run_id"), ["engine_run_id"], unique=False)
    for table in SEARCHED:
        _create_search(table)


def downgrade() -> None:
    for table in SEARCHED:
        _drop_search(table)
    op.drop_table("lens_readings")
