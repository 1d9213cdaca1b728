"""`selfie flower`: Flower on the service's broker, with the workers' JSON-only Celery app, and always behind
HTTP basic auth (it refuses to start without SELFIE_FLOWER_USER and SELFIE_FLOWER_PASSWORD).

The credentials go to Flower in its environment (`FLOWER_BASIC_AUTH`, which Flower reads as `--basic-auth`), never
on its command line: any local user can read a process's arguments (`ps`, /proc/PID/cmdline), while its environment
is readable only by its owner. Flower runs through `selfie_cli.flower_app`, which puts its `/metrics` page behind
the same basic auth (Flower serves it to anyone).
"""

from __future__ import annotations

import sys


class FlowerConfigError(ValueError):
    pass


def flower_command(user: str | None, password: str | None, *, host: str, port: int,
                   broker: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) that run Flower; raises FlowerConfigError without usable credentials."""
    if not user or not password:
        raise FlowerConfigError(
            "Flower needs basic-auth credentials: set SELFIE_FLOWER_USER and SELFIE_FLOWER_PASSWORD "
            "(it shows task arguments and can shut workers down, so it never runs open)"
        )
    if ":" in user or "," in user or "," in password:
        raise FlowerConfigError("SELFIE_FLOWER_USER may not contain ':' or ',' and SELFIE_FLOWER_PASSWORD not ','")
    if len(password) < 8:
        raise FlowerConfigError("SELFIE_FLOWER_PASSWORD is too short (8 characters at least)")
    # `-A workers.celery_app`: the same JSON-only app the workers use (no pickle accepted, none sent).
    # Flower's own options only take the --name=value form.
    argv = [sys.executable, "-m", "selfie_cli.flower_app", "-A", "workers.celery_app"]
    if broker:
        argv += ["--broker", broker]
    argv += ["flower", f"--address={host}", f"--port={port}"]
    return argv, {"FLOWER_BASIC_AUTH": f"{user}:{password}"}
