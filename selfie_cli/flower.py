"""`selfie flower`: Flower on the service's broker, with the workers' JSON-only Celery app, and always behind
HTTP basic auth (it refuses to start without SELFIE_FLOWER_USER and SELFIE_FLOWER_PASSWORD)."""

from __future__ import annotations

import sys


class FlowerConfigError(ValueError):
    pass


def flower_argv(user: str | None, password: str | None, *, host: str, port: int) -> list[str]:
    """The command line that runs Flower; raises FlowerConfigError without usable credentials."""
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
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "flower", f"--address={host}",
            f"--port={port}", f"--basic-auth={user}:{password}"]
