"""Alembic environment: URL from the caller (or SELFIE_* settings), metadata from selfie_jobs.models."""

from __future__ import annotations

import warnings
from logging.config import fileConfig

from alembic import context
from sqlalchemy.exc import SAWarning

from selfie_jobs.db import create_db_engine
from selfie_jobs.models import Base
from selfie_jobs.search import is_search_object

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from selfie_jobs.settings import get_settings

    return get_settings().resolved_database_url()


def _include_object(obj, name, type_, reflected, compare_to) -> bool:  # noqa: ANN001 - Alembic's hook
    # The full-text objects (FTS5 tables, GIN expression indexes) are made by SQL in 0010 and not declared in the
    # models: autogenerate must neither drop nor compare them.
    return not is_search_object(name)


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_object=_include_object,
        # SQLite cannot ALTER most things in place: batch mode rebuilds the table, so the same
        # revisions run on SQLite and PostgreSQL.
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_db_engine(_url())
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # A batch migration rebuilds a table (copy, drop, rename). With foreign keys on, dropping the old
                # table runs ON DELETE CASCADE on the rows that refer to it (a prompt set's items, an audit's runs):
                # they would be lost. The pragma only takes effect outside a transaction, so it is set here, and
                # every reference is checked before the migration commits.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()  # ends SQLAlchemy's implicit transaction, so that Alembic's own commits
            _configure(connection=conn)
            with context.begin_transaction(), warnings.catch_warnings():
                # A batch rebuild on SQLite reflects the tables its table refers to; SQLite cannot reflect the
                # expression index of 0005 (unique names per key), which no later migration rebuilds (the
                # migration test checks it survives), so the warning on every fresh `selfie up` says nothing.
                warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index",
                                        SAWarning)
                context.run_migrations()
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"the migration left rows referring to missing rows: {broken[:10]}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
