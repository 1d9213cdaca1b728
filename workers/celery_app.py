"""The workers' Celery app, built by `create_celery_app(settings)`; nothing is created or connected at import.

`celery -A workers.celery_app ...` (Flower, inspect) finds `app` through a lazy module attribute that builds it
from the SELFIE_* settings on first access.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from selfie_jobs.queue import (
    BROKER_TRANSPORT_OPTIONS,
    CONTROL_QUEUE,
    MAX_PRIORITY,
    PURGE_TASK,
    RECONCILE_TASK,
    RUN_AUDIT_TASK,
    RUN_CHUNK_TASK,
    RUN_EDIT_TASK,
    broker_socket_timeouts,
    model_queue,
    redis_priority,
)
from selfie_jobs.settings import Settings, get_settings

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

#: Longer than the api's bound (no client waits on a worker's sends, and a slow reply should not cost the consumer
#: its connection), short enough that a reconciler pass on a frozen broker fails well within its time limit.
BROKER_SOCKET_TIMEOUT_SECONDS = 3.0


def visibility_timeout(settings: Settings) -> int:
    """Longer than the longest chunk (its hard time limit) with a wide margin, and never under an hour."""
    longest = max(settings.chunk_soft_time_limit_seconds, settings.edit_soft_time_limit_seconds)
    return max(3600, 2 * (longest + 60))


def declared_queue(name: str) -> Queue:
    """A queue bound to its own direct exchange under its own name: exactly what a producer that only names the
    queue (Celery's create_missing_queues) publishes to, and what a rejected message is restored through."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def create_celery_app(
    settings: Settings | None = None,
    *,
    models: Sequence[str] = (),
    broker_url: str | None = None,
    register: bool = True,
) -> Celery:
    """A Celery app for workers and beat.

    `models`: the served models whose queues this app declares (a worker consumes its model's queue and the
    control queue). `register`: also register the task functions (False for a producer or Flower).
    """
    settings = settings or get_settings()
    app = Celery("selfie", broker=broker_url or settings.redis_url or DEFAULT_BROKER, set_as_current=False)
    soft = settings.chunk_soft_time_limit_seconds
    app.conf.update(
        # --- serialization: JSON only -------------------------------------------------------------------------
        # Only ids and small JSON travel on the queue; pickle would let anyone who can write to Redis run code
        # in a worker. accept_content makes the worker refuse any other content type outright.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # --- delivery: at least once, decided by the database --------------------------------------------------
        # Acknowledge after the task ran, not on receipt: a worker that dies mid-chunk leaves the message
        # unacknowledged, so Redis hands it to another worker. Duplicates are harmless (the chunk claim is a
        # compare-and-set and result rows are unique).
        task_acks_late=True,
        # When the pool child running a task is killed (SIGKILL, OOM killer, CUDA abort) put the message back
        # instead of acknowledging it as failed; the restarted child picks it up.
        task_reject_on_worker_lost=True,
        # A task that raised handled its own failure in the DB (job failed with a stored error): ack it.
        task_acks_on_failure_or_timeout=True,
        # One message at a time per process: a chunk runs for seconds to minutes on one GPU, and prefetched
        # messages would sit behind it instead of going to an idle worker. Cross-job batching happens by
        # claiming queued chunks from the database, not by prefetching messages.
        worker_prefetch_multiplier=1,
        # Redis re-delivers an unacknowledged message after visibility_timeout; it must exceed the longest chunk
        # or a healthy worker's chunk would be handed out twice. Priority lists as the producer names them.
        # Broker replies are bounded so that a frozen Redis fails a send (a reconciler pass, an audit's chunks)
        # instead of holding it; the consumer then reconnects as after any connection loss.
        broker_transport_options={**BROKER_TRANSPORT_OPTIONS, **broker_socket_timeouts(BROKER_SOCKET_TIMEOUT_SECONDS),
                                  "visibility_timeout": visibility_timeout(settings)},
        # Keep retrying the broker forever, at start-up too: a worker outlives a Redis restart.
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # On a broker connection loss keep running the current chunk: its result goes to the database, and the
        # redelivered message then finds the chunk done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # --- results: the database holds them ----------------------------------------------------------------
        task_ignore_result=True,
        result_backend=None,
        task_store_errors_even_if_ignored=False,
        # --- queues and routes ----------------------------------------------------------------------------------
        # One queue per served model (a worker only receives work for the model it holds) plus a control queue
        # for housekeeping any worker can do. run_chunk is routed by the sender (the model is in the call).
        # Each queue has its own exchange: with Celery's default exchange shared by all, a control message would
        # also be copied into every model queue bound under the same key.
        task_queues=[declared_queue(CONTROL_QUEUE), *(declared_queue(model_queue(m)) for m in models)],
        task_default_exchange=CONTROL_QUEUE,
        task_default_routing_key=CONTROL_QUEUE,
        task_default_queue=CONTROL_QUEUE,
        task_routes={RECONCILE_TASK: {"queue": CONTROL_QUEUE}, RUN_AUDIT_TASK: {"queue": CONTROL_QUEUE},
                     PURGE_TASK: {"queue": CONTROL_QUEUE}},
        # Queues of models this app was not told about are still created when a task names them.
        task_create_missing_queues=True,
        # --- priorities -------------------------------------------------------------------------------------------
        # Redis priorities are per-priority lists (see broker_transport_options); job priority 5 is the default.
        task_default_priority=redis_priority(5),
        task_queue_max_priority=MAX_PRIORITY,
        # --- time limits ------------------------------------------------------------------------------------------
        # A chunk that runs past its soft limit gets SoftTimeLimitExceeded and hands its chunks back (or fails
        # its job after repeated attempts); the hard limit kills a process stuck in native code.
        task_annotations={
            RUN_CHUNK_TASK: {"soft_time_limit": soft, "time_limit": soft + 60},
            RUN_EDIT_TASK: {"soft_time_limit": settings.edit_soft_time_limit_seconds,
                            "time_limit": settings.edit_soft_time_limit_seconds + 60},
            RECONCILE_TASK: {"soft_time_limit": 120, "time_limit": 180},
        },
        # The pool child loads the model in worker_process_init (minutes for a big model on a cold disk); the
        # parent must not kill it for being slow to start (default: 4 s).
        worker_proc_alive_timeout=max(600.0, float(settings.lease_seconds)),
        # --- monitoring -----------------------------------------------------------------------------------------
        # Task events for Flower (received/started/succeeded per worker), and "sent" events from producers.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Remote control (inspect, ping, shutdown) is what Flower and `celery inspect` use to see the workers.
        worker_enable_remote_control=True,
        # --- beat -------------------------------------------------------------------------------------------------
        # The reconciler re-sends chunks Redis lost; messages expire so an outage does not pile them up.
        beat_schedule={
            "reconcile": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval_seconds,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.reconcile_interval_seconds * 2},
            },
            # Audits: start runs whose cron fired, resume stalled fan-outs, scan finished jobs.
            **_audit_beat_entries(settings),
            # Retention: delete the jobs past their time to live (selfie_jobs.retention).
            **_retention_beat_entries(settings),
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        timezone="UTC",
        enable_utc=True,
        # Celery's own logging setup stays, but never takes over the root logger of an embedding program.
        worker_hijack_root_logger=False,
    )
    if register:
        from workers.tasks import register_tasks

        register_tasks(app, settings)
    return app


def _audit_beat_entries(settings: Settings) -> dict[str, Any]:
    from workers.audits import beat_entries

    return beat_entries(settings)


def _retention_beat_entries(settings: Settings) -> dict[str, Any]:
    from workers.retention import beat_entries

    return beat_entries(settings)


def __getattr__(name: str) -> Any:  # PEP 562: `celery -A workers.celery_app` finds `app` only when asked
    if name in ("app", "celery"):
        global _LAZY_APP
        if _LAZY_APP is None:
            settings = get_settings()
            _LAZY_APP = create_celery_app(settings, models=[settings.default_model])
        return _LAZY_APP
    raise AttributeError(name)


_LAZY_APP: Celery | None = None
