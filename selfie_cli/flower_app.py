"""Run Flower with its `/metrics` page behind the same basic auth as its other pages.

Flower serves `/metrics` (Prometheus: worker names, task names and counts) without checking who asks, even with
`--basic-auth` set. Before Flower builds its app, this module swaps that route's handler for a subclass whose
`get` requires the logged-in user (Flower's own `get_current_user`, which checks the basic-auth header), then runs
the `celery ... flower` command with the arguments it was given. Nothing else of Flower changes. A test runs a real
Flower through this module and checks `/metrics` answers 401 without the credentials and 200 with them.
"""

from __future__ import annotations

import sys


def _protect_metrics() -> None:
    from flower import urls
    from flower.views.monitor import Metrics
    from tornado import web

    class AuthenticatedMetrics(Metrics):
        @web.authenticated
        async def get(self):
            await super().get()

    replaced = 0
    for i, handler in enumerate(urls.handlers):
        if isinstance(handler, tuple) and handler[0] == r"/metrics" and handler[1] is Metrics:
            urls.handlers[i] = (handler[0], AuthenticatedMetrics, *handler[2:])
            replaced += 1
    if replaced != 1:  # a Flower whose routes changed: refuse to run with the page open rather than guess
        raise RuntimeError("cannot find Flower's /metrics route to put it behind basic auth")


def main(argv: list[str]) -> int:
    """`argv`: the arguments after `celery` (e.g. `-A workers.celery_app flower --port=5555`)."""
    from celery.bin.celery import main as celery_main

    _protect_metrics()
    sys.argv = ["celery", *argv]
    return celery_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
