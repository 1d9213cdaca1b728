"""The queue contract between the api and the workers: task names, queue names, payloads.

Only ids travel on the queue, serialised as JSON; everything else is read from the database.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

RUN_CHUNK_TASK = "selfie.run_chunk"
RECONCILE_TASK = "selfie.reconcile"
RUN_AUDIT_TASK = "selfie.run_audit"
#: Edit jobs (supervised, reinforce) run on their model's queue under a name of their own, so that monitoring
#: (Flower) tells a long edit from interpretation work, and under a time limit of their own.
RUN_EDIT_TASK = "selfie.run_edit"
EDIT_KINDS = ("supervised", "reinforce")
PURGE_TASK = "selfie.purge"

#: Queue for housekeeping tasks (reconciler, audits, purge) that any worker may run.
CONTROL_QUEUE = "selfie.control"

#: Job priorities run 0 (lowest) .. 9 (most urgent).
MAX_PRIORITY = 9

#: Redis has no native priorities: kombu keeps one list per priority step and reads the lower step first.
#: Producer and workers must use the same options, or they name the per-priority lists differently.
BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
    "priority_steps": list(range(MAX_PRIORITY + 1)),
    "sep": ":",
    "queue_order_strategy": "priority",
}


def broker_socket_timeouts(seconds: float) -> dict[str, float]:
    """Transport options that bound each broker connect and reply to `seconds`.

    Once connected, kombu's Redis transport waits forever for a reply by default: a broker that is stopped, or
    behind a half-open link, would hold every send until it came back. A send that gives up instead leaves its
    chunk to the reconciler. A consumer's BRPOP asks Redis to answer within a second and is read once readable, so
    any bound above that leaves consuming as it is.
    """
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds}


_QUEUE_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def model_queue(model: str) -> str:
    """One queue per served model, so a worker only receives work for the model it holds.

    A name made only of letters, digits, ``_``, ``.`` and ``-`` is the queue's name as it is. Any other character
    becomes ``_`` and the name gets ``~`` and a hash of the model's own name, so that two models never share a queue
    (``org/m`` and ``org_m`` would otherwise both be ``selfie.model.org_m``); ``~`` is never in a name kept as is.
    """
    safe = _QUEUE_SAFE.sub("_", model)
    if safe == model:
        return "selfie.model." + model
    return f"selfie.model.{safe}~{hashlib.blake2b(model.encode(), digest_size=4).hexdigest()}"


def redis_priority(priority: int) -> int:
    """Job priority (9 = most urgent) -> Celery's Redis message priority (0 = read first)."""
    return MAX_PRIORITY - max(0, min(MAX_PRIORITY, int(priority)))


def run_chunk_args(chunk_id: int) -> list[int]:
    return [int(chunk_id)]


class TaskSender(Protocol):
    """What enqueueing needs from a Celery app; the api holds a producer-only app, workers their own."""

    def send_task(self, name: str, args: list[Any] | None = ..., **options: Any) -> Any: ...


def chunk_task(kind: str | None) -> str:
    """The task name of a chunk of this job kind (both run `workers.tasks.run_chunk`)."""
    return RUN_EDIT_TASK if kind in EDIT_KINDS else RUN_CHUNK_TASK


def send_chunk(sender: TaskSender, chunk_id: int, model: str, priority: int, kind: str | None = None) -> None:
    """Wake a worker of `model` up for one chunk. The message is a hint: the chunk row decides what happens."""
    sender.send_task(chunk_task(kind), args=run_chunk_args(chunk_id), queue=model_queue(model),
                     priority=redis_priority(priority))


@contextmanager
def message_counter(app: Any) -> Iterator[Callable[[str], int]]:
    """`waiting(queue)`: how many messages wait in `queue`, over all its priority lists, as the broker counts them.

    `app` is a Celery app with the transport options above (they name the per-priority lists). Kombu counts for
    the Redis transport; messages a worker has taken but not acknowledged are not waiting.
    """
    from kombu.exceptions import ChannelError

    with app.connection_for_read() as connection:
        channel = connection.default_channel

        def waiting(queue: str) -> int:
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError:  # a queue none of whose lists exists holds no message
                return 0

        yield waiting
