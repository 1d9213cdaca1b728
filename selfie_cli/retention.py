"""`selfie purge` (delete the expired jobs now) and `selfie keys ttl` (a key's default time to live for its jobs).

Durations are seconds or a number with a unit: `90s`, `30m`, `12h`, `30d`; `none` leaves a key's jobs to the
service's default (SELFIE_JOB_TTL_SECONDS).
"""

from __future__ import annotations

import re

import click

from selfie_cli.database import cli_session
from selfie_cli.errors import UserError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*([0-9]+)\s*([smhd]?)\s*$")  # ASCII digits: int() also reads '١٢' and '１２' as 12


class Duration(click.ParamType):
    """A time to live: seconds (`3600`, `90s`, `30m`, `12h`, `30d`), or `none` (None)."""

    name = "duration"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "none":
            return None
        from selfie_jobs.specs import MAX_TTL_SECONDS

        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration: give seconds or a number with s, m, h or d (30d), or none",
                      param, ctx)
        seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
        if not 1 <= seconds <= MAX_TTL_SECONDS:
            self.fail(f"{value!r} is {seconds} s; a time to live is 1 s .. {MAX_TTL_SECONDS} s (ten years), or none",
                      param, ctx)
        return seconds


DURATION = Duration()


def describe(seconds: int | None) -> str:
    if seconds is None:
        return "for ever"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@click.command()
@click.option("--dry-run", is_flag=True, help="Count what is expired; delete nothing.")
def purge(dry_run: bool) -> None:
    """Delete expired jobs with their results, chunks, engine runs and closed audit runs (docs/api.md, Retention).

    Beat runs the same purge every SELFIE_PURGE_INTERVAL_SECONDS; running it twice does no harm."""
    from selfie_jobs.db import get_sessionmaker
    from selfie_jobs.retention import count_expired, purge_expired
    from selfie_jobs.settings import get_settings

    settings = get_settings()
    default = f"default time to live {describe(settings.job_ttl_seconds)}"
    if dry_run:
        with cli_session() as session:
            counts = count_expired(session, settings)
        click.echo(f"expired: {counts['jobs']} job(s), {counts['audit_runs']} audit run(s) ({default}); "
                   "nothing deleted")
        return
    from selfie_cli.database import migrated_database_url

    report = purge_expired(get_sessionmaker(migrated_database_url()), settings)
    click.echo(f"purged {report.jobs} job(s) with {report.results} result row(s), {report.audit_runs} audit "
               f"run(s) with {report.findings} finding(s), {report.engine_runs} engine run(s) ({default})")


def set_key_ttl(key: str, ttl: int | None) -> None:
    """`selfie keys ttl KEY DURATION`: the default time to live of the key's jobs (None: the service's)."""
    from selfie_jobs.auth import find_key

    with cli_session() as session:
        try:
            row = find_key(session, key)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        if row is None:
            raise UserError(f"no key {key!r}", "`selfie keys list` shows the keys (ids and prefixes)")
        row.job_ttl_seconds = ttl
        key_id = row.id
    kept = f"{describe(ttl)} after they finish" if ttl is not None else "as the service's default says"
    click.echo(f"key {key_id}: its jobs are kept {kept}, unless a job asks otherwise")
