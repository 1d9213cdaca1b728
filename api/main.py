"""The FastAPI app factory. Nothing is built at import: `uvicorn api.main:create_app --factory`."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from selfie_jobs.db import get_sessionmaker
from selfie_jobs.queue import TaskSender
from selfie_jobs.settings import Settings, get_settings


def _redis_pinger(url: str):
    def ping() -> bool:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    return ping


def create_app(settings: Settings | None = None, task_sender: TaskSender | None = None) -> FastAPI:
    """Build the app for `settings` (default: from the SELFIE_* environment).

    `task_sender` replaces the producer-only Celery app (anything with `send_task`).
    """
    from api import errors
    from api.broker import DEFAULT_REDIS_URL, make_producer
    from api.ratelimit import make_rate_limiter
    from api.routes import edits, events, jobs, search, system, uploads, variants

    settings = settings or get_settings()
    broker_url = settings.redis_url or DEFAULT_REDIS_URL
    producer = None
    if task_sender is None:
        producer = make_producer(broker_url)
        task_sender = producer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The sync routes' threads: two per request served at once, so that no admitted request waits for a thread
        # held by another admitted request (a route may use two at a time: a sync dependency's exit, a streamed
        # CSV's reads); the database pool holds two connections per request too (selfie_jobs.db).
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2 * settings.max_concurrent_requests
        yield
        if producer is not None:
            producer.close()
        close = getattr(app.state.rate_limiter, "close", None)
        if close is not None:
            close()

    # Swagger UI and ReDoc from the assets the fastapi-offline wheel ships, not from a CDN: GPU clusters are often
    # air-gapped, and /docs should work wherever the explorer pages do.
    app = FastAPIOffline(
        static_url="/docs-assets",
        title="SelfIE interpretation service",
        version="0.1.0",
        description="Ask a language model what its own hidden states mean: submit jobs, follow them, read results.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessionmaker = get_sessionmaker(settings.resolved_database_url())
    app.state.task_sender = task_sender
    app.state.event_streams = events.StreamSlots(settings.max_event_streams)
    app.state.redis_ping = _redis_pinger(broker_url)
    app.state.rate_limiter = make_rate_limiter(
        settings.redis_url, settings.rate_limit_per_minute, settings.resolved_database_url()
    )

    from api.gate import Authentication
    from api.limits import BodySizeLimit
    from api.overload import ConcurrencyLimit

    # Outermost last: a request waits for a slot, then its key is checked, then its body is counted as it is read.
    app.add_middleware(BodySizeLimit)
    app.add_middleware(Authentication)
    app.add_middleware(ConcurrencyLimit, limit=settings.max_concurrent_requests,
                       wait_seconds=settings.queue_wait_seconds)
    if settings.cors_origins:  # closed unless origins are configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    errors.install(app)
    app.include_router(uploads.router)
    app.include_router(jobs.router)
    app.include_router(edits.router)
    app.include_router(events.router)
    app.include_router(search.router)
    app.include_router(variants.router)
    app.include_router(system.router)
    # Audits, /metrics and the explorer pages.
    from api import metrics
    from api.routes import audits, pages

    app.include_router(audits.router)
    metrics.install(app)
    pages.mount(app)
    return app


def app_info(app: FastAPI) -> dict[str, Any]:
    """What the app was built with (for logs and `selfie up`)."""
    settings: Settings = app.state.settings
    return {"database": settings.resolved_database_url(), "redis": settings.redis_url, "auth": settings.auth_enabled}
