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

    url = get_settings().resolved_database_url()
    if not check(url):
        shown = make_url(url).render_as_string(hide_password=True)
        raise UserError(f"the database {shown} does not have the service's newest schema",
                        "run `selfie migrate` first (`selfie up` migrates too), with the same SELFIE_DATABASE_URL "
                        "or SELFIE_DATA_DIR")
    return url


def cli_session():
    """A session on the migrated database (selfie_jobs.db.session_scope)."""
    from selfie_jobs.db import session_scope

    return session_scope(migrated_database_url())
