"""The service's database for the commands that write to it directly (`selfie keys`, `selfie models`).

Those commands run before any service may have started, often on a fresh data folder: a database without the
schema is refused with the command that makes it, instead of the driver's "no such table" traceback.
"""

from __future__ import annotations

from selfie_cli.errors import UserError


def migrated_database_url() -> str:
    """The settings' database URL, once it is known to be at the newest schema."""
    from sqlalchemy.engine import make_url

    from selfie_jobs.migrate import check
    from selfie_jobs.settings import get_settings

    from pathlib import Path

    from selfie_jobs.migrate import current_revision, head_revision, known_revisions

    url = get_settings().resolved_database_url()
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and not (parsed.database and Path(parsed.database).is_file()):
        # connecting would create an empty file there (and then call it out of date)
        raise UserError(f"there is no database at {parsed.database}",
                        "is SELFIE_DATA_DIR (or SELFIE_DATABASE_URL) the one `selfie up` uses? `selfie migrate` "
                        "makes a new one")
    if not check(url):
        revision = current_revision(url)
        if revision is not None and revision not in known_revisions():
            raise UserError(f"the database {shown} is at revision {revision}, newer than this selfie "
                            f"({head_revision()})", "run the selfie that migrated it, or upgrade this one")
        raise UserError(f"the database {shown} does not have the service's newest schema",
                        "run `selfie migrate` first (`selfie up` migrates too), with the same SELFIE_DATABASE_URL "
                        "or SELFIE_DATA_DIR")
    return url


def cli_session():
    """A session on the migrated database (selfie_jobs.db.session_scope)."""
    from selfie_jobs.db import session_scope

    return session_scope(migrated_database_url())


def catalogued_source(name: str, *, model_path: str | None, dtype: str | None) -> tuple[str | None, str]:
    """(folder or hub id, dtype) for `selfie interpret --model NAME`, by the workers' rule (cards.load_source).

    That command also runs without a service: with no database yet (a fresh data folder) or one without the schema
    there is no catalogue, and NAME loads as the built-in model or a hub id, as before the catalogue existed.
    """
    from pathlib import Path

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from selfie_core.loading import BUILTIN
    from selfie_jobs.cards import load_source
    from selfie_jobs.db import session_scope
    from selfie_jobs.migrate import check
    from selfie_jobs.settings import get_settings

    uncatalogued = (model_path, dtype or "float32")
    if model_path or name in BUILTIN:  # `selfie models add` refuses the built-in names
        return uncatalogued
    url = make_url(get_settings().resolved_database_url())
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
        return uncatalogued  # connecting would create the file
    try:
        if not check(url.render_as_string(hide_password=False)):
            return uncatalogued
        with session_scope(url.render_as_string(hide_password=False)) as session:
            return load_source(session, name, model_path=model_path, dtype=dtype)
    except SQLAlchemyError as exc:  # a database server that is away: said, and the name loads as a hub id
        import click

        click.echo(f"warning: the model catalogue in {url.render_as_string(hide_password=True)} cannot be read "
                   f"({str(exc).splitlines()[0]}); {name!r} loads as a hub id", err=True)
        return uncatalogued
