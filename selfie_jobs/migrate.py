"""Programmatic Alembic: bring a database to the newest schema, or check that it is there.

Used by `selfie migrate`, `selfie up`, the one-shot migrate service of docker-compose and the tests, so the
schema is always made by the same revisions.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None, *, configure_logging: bool = False) -> Config:
    """An Alembic Config for migrations/; `url` overrides the settings' database URL."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["configure_logging"] = configure_logging
    if url:
        cfg.attributes["url"] = url
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Apply every migration up to `revision` (idempotent: an up-to-date database is left as it is)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def known_revisions() -> set[str]:
    """Every revision this code has (a database at another one was migrated by a newer version)."""
    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def current_revision(url: str) -> str | None:
    from selfie_jobs.db import create_db_engine

    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def check(url: str) -> bool:
    """True when the database is at the newest revision (readiness checks use this)."""
    return current_revision(url) == head_revision()
