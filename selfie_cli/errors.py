"""User errors as one or two lines, never a traceback: what was wrong and what to do.

Exit status 2 for a usage error (a bad option value: the command line must change), 1 for a runtime error (the
server refused or could not be reached, a file or model folder is missing). `selfie --debug ...` (or
SELFIE_DEBUG=1) lets every exception through with its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

USAGE = 2
RUNTIME = 1


class UserError(click.ClickException):
    """A runtime error the user can act on: a message line and an optional hint line; exit status 1."""

    exit_code = RUNTIME

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def show(self, file: Any = None) -> None:
        _print_error(self.message, self.hint)


def _print_error(message: str, hint: str | None = None) -> None:
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(hint, err=True)


def debug_enabled() -> bool:
    return os.environ.get("SELFIE_DEBUG", "").lower() in ("1", "true", "yes")


def http_detail(detail: Any) -> str:
    """FastAPI's detail as one line: a string as is, a list of validation errors as 'where: what; ...'."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def _running_command() -> str:
    """`selfie SUBCOMMAND` of the running command line, as a user types it (whatever the program was run as)."""
    ctx = click.get_current_context(silent=True)
    names: list[str] = []
    while ctx is not None:
        if ctx.parent is not None:
            names.insert(0, ctx.info_name)
        elif ctx.invoked_subcommand and not names:
            names.append(ctx.invoked_subcommand)
        ctx = ctx.parent
    return " ".join(["selfie", *names]) if names else "selfie COMMAND"


def hint_for_status(status: int, command: str | None = None) -> str | None:
    if status == 401:
        return "pass an API key with --api-key or SELFIE_API_KEY (`selfie keys create NAME` makes one)"
    if status == 403:
        return "this key may not see that; use the key that made it, or an admin key"
    if status == 404:
        return "check the id (`selfie status ID`, GET /v1/jobs lists your jobs)"
    if status == 429:
        return "the rate limit or the daily quota was reached; retry later"
    if status == 503:
        return "the service is busy or its database is away; retry in a few seconds"
    if status in (400, 409, 413, 422):
        if command is None:
            command = _running_command()
        return f"change the request and try again (`{command} -h` lists the options)"
    return None


def translate(exc: BaseException) -> click.ClickException | None:
    """The user-facing error for `exc`, or None when it is not one the user caused or can act on."""
    import httpx

    from selfie_client.client import SelfieError, ServiceUnreachable

    if isinstance(exc, ServiceUnreachable):
        return UserError(str(exc), "start it with `selfie up` (or `selfie api`), or point --url / SELFIE_URL at it")
    if isinstance(exc, SelfieError):
        where = f" ({exc.field})" if exc.field else ""
        return UserError(f"the server answered {exc.status}{where}: {http_detail(exc.detail)}",
                         hint_for_status(exc.status))
    if isinstance(exc, httpx.TimeoutException):
        return UserError(f"the server did not answer in time ({type(exc).__name__})", "retry, or check its load")
    if isinstance(exc, httpx.TransportError):
        return UserError(f"the connection to the server failed: {exc}", "check that it is running and retry")
    if isinstance(exc, FileNotFoundError):
        return UserError(_os_message(exc), "check the path")
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return UserError(_os_message(exc), "choose a path you may write or read")
    if isinstance(exc, OSError):  # disk full, read-only, a hub id that cannot be fetched here, ...
        return UserError(_os_message(exc), None)
    if isinstance(exc, ValueError):  # the engine's and the client's input checks (out-of-range layers, ...)
        return click.UsageError(str(exc))
    return None


def _os_message(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


class SelfieGroup(click.Group):
    """The `selfie` group: click's own usage errors shortened to two lines, every other user error translated."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            _usage(exc)
        except UserError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:  # click's own (FileError, ...): the same form, not click's "Error: "
            _print_error(exc.format_message())
            sys.exit(RUNTIME)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if debug_enabled():
                raise
            _unexpected(exc)
        # a command that returned an int (as click's standalone mode would do) exits with it
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:  # noqa: D102
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            translated = translate(exc)
            if translated is None:
                raise
            raise translated from exc


def _usage(exc: click.UsageError) -> NoReturn:
    ctx = exc.ctx
    _print_error(exc.format_message(),
                 f"see `{ctx.command_path} --help`" if ctx is not None else "see `selfie --help`")
    sys.exit(USAGE)


def _unexpected(exc: BaseException) -> NoReturn:
    _print_error(f"{type(exc).__name__}: {exc}",
                 "this is a fault of selfie, not of your input: run again with `selfie --debug ...` for the "
                 "traceback and report it")
    sys.exit(RUNTIME)
