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
