"""The Alembic revisions produce exactly the schema the SQLAlchemy models declare, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from selfie_jobs import migrate
from selfie_jobs.db import create_db_engine
from selfie_jobs.models import Base


def test_upgrade_head_matches_models(database_url):
    migrate.upgrade(database_url)
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
            diff = compare_metadata(ctx, Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == [], f"migrations differ from the models: {diff}"
    assert set(Base.metadata.tables) <= tables
    assert migrate.check(database_url)


def test_upgrade_is_idempotent_and_downgrade_works(database_url):
    migrate.upgrade(database_url)
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision()
    migrate.downgrade(database_url, "base")
    assert migrate.current_revision(database_url) is None
    assert not migrate.check(database_url)


def test_uploads_named_like_a_built_in_are_renamed(database_url):
    from sqlalchemy import text

    migrate.upgrade(database_url, "0003_job_request_hash")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO prompt_sets (id, name, description, source, size, created_at) VALUES "
                              "(7, 'prompt_injections', '', 'upload', 0, CURRENT_TIMESTAMP), "
                              "(8, 'mine', '', 'upload', 0, CURRENT_TIMESTAMP)"))
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            names = dict(conn.execute(text("SELECT id, name FROM prompt_sets ORDER BY id")).all())
    finally:
        engine.dispose()
    assert names == {7: "prompt_injections (upload 7)", 8: "mine"}
