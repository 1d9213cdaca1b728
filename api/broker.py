"""The api's producer-only Celery app: it sends tasks by name and never runs, imports or registers any."""

from __future__ import annotations

from celery import Celery

from selfie_jobs import queue

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: A local Redis answers in milliseconds; a send is tried three times, each with a reconnect after a failure.
SOCKET_TIMEOUT_SECONDS = 1.0


def make_producer(broker_url: str) -> Celery:
    """Nothing connects here; the first `send_task` opens the broker connection (pooled afterwards)."""
    app = Celery("selfie-api", broker=broker_url, set_as_current=False)
    app.conf.update(
        # JSON only: the queue carries ids, and pickle would let whoever writes to Redis run code in workers.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # The database holds every result; the api never waits for a task.
        task_ignore_result=True,
        result_backend=None,
        # A submit must not hang on a dead broker: fail fast, the stored chunks are re-sent by the reconciler.
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=False,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.25, "interval_max": 0.5},
        # Priorities map to per-priority Redis lists: name them exactly as the workers read them. A broker that
        # stops answering fails a send within a few seconds (each try and each reconnect waits at most this long)
        # instead of holding the request: hung submits would take every request slot of the api.
        broker_transport_options={**queue.BROKER_TRANSPORT_OPTIONS,
                                  **queue.broker_socket_timeouts(SOCKET_TIMEOUT_SECONDS)},
    )
    return app
