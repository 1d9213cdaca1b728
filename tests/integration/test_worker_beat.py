"""`python -m workers beat` sends the reconcile and purge tasks to the control queue on their schedules (real
Redis)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys

import pytest
import redis

from selfie_jobs.queue import CONTROL_QUEUE, PURGE_TASK, RECONCILE_TASK
from tests.integration.worker_support import ROOT, wait_for, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _messages(client: redis.Redis) -> list[dict]:
    out = []
    for key in client.scan_iter(match=CONTROL_QUEUE + "*"):
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            assert message["content-type"] == "application/json"
            out.append({"task": message["headers"]["task"], "args": json.loads(base64.b64decode(message["body"]))})
    return out


def test_beat_sends_reconcile_on_schedule(tmp_path, sqlite_url):
    from workers.embedded import start_embedded_redis

    with start_embedded_redis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        env = worker_env(sqlite_url, server.url, tmp_path, SELFIE_RECONCILE_INTERVAL_SECONDS="1")
        with open(tmp_path / "beat.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "workers", "beat", "--loglevel", "INFO"], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                sent = wait_for(lambda: [m for m in _messages(client) if m["task"] == RECONCILE_TASK], 60,
                                what="a reconcile message from beat")
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
        assert sent[0]["args"][0] == []  # no arguments: the database says what to re-send
        assert (tmp_path / "celerybeat-schedule").exists() or any(tmp_path.glob("celerybeat-schedule*"))


def test_beat_sends_the_purge_on_schedule(tmp_path, sqlite_url):
    from workers.embedded import start_embedded_redis

    with start_embedded_redis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        env = worker_env(sqlite_url, server.url, tmp_path, SELFIE_PURGE_INTERVAL_SECONDS="1")
        with open(tmp_path / "beat.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "workers", "beat", "--loglevel", "INFO"], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                sent = wait_for(lambda: [m for m in _messages(client) if m["task"] == PURGE_TASK], 60,
                                what="a purge message from beat")
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
        assert sent[0]["args"][0] == []  # no arguments: the database and the settings say what has expired
