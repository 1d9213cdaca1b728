"""Claims: which chunks an engine run takes, and giving them back.

`claim` takes the chunk a message names (compare-and-set, so one worker gets it) plus queued companions of the same
model and engine settings, and reads and records what their run needs in the same transaction. `ClaimAhead` claims
the next run of a batch key while the engine computes the current one (`workers.overlap`). `hand_back` puts chunks
that will not be finished back in the queue (or fails their job past its attempts) and re-sends their messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from selfie_jobs import chunks as chunk_ops
from selfie_jobs.kinds import get_kind
from selfie_jobs.liveness import live_workers, owner_is_alive
from selfie_jobs.models import Chunk, Job
from selfie_jobs.queue import TaskSender, send_chunk
from selfie_jobs.reconcile import Redelivery
from selfie_jobs.retry import unit_of_work
from selfie_jobs.variants import variant_refs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    chunks: list[chunk_ops.ClaimedChunk]
    why: str | None = None  # why nothing was claimed
    resend: Redelivery | None = None  # a message for another model's chunk: sent on to that model's workers
    inputs: dict[Any, Any] | None = None  # what the chunks' kinds loaded for them (prompts, vectors)
    run_id: str | None = None  # the engine run recorded for them
    variants: dict[str, Any] | None = None  # the rows of the variants their specs name (VariantRef), by id


def claim(runtime, chunk_id: int) -> Claim:
    settings = runtime.settings
    owner = runtime.name

    def unit(session) -> Claim:
        # The model is part of the compare-and-set: a chunk this worker cannot run is never claimed, so a
        # message that reached the wrong model's worker uses up none of the chunk's attempts.
        first = chunk_ops.claim_chunk(session, chunk_id, owner, settings.lease_seconds, model=runtime.model)
        if first is None:
            # the columns the answer needs, no ORM object: most messages that find their chunk taken are for
            # chunks a cross-job batch claimed with another one (claim_more), and a worker reads one per message
            row = session.connection().execute(
                select(Chunk.id, Chunk.job_id, Chunk.model, Chunk.state, Chunk.owner, Chunk.priority)
                .where(Chunk.id == chunk_id)).first()
            if row is None:
                return Claim([], "no such chunk")
            if row.model != runtime.model:
                return _misrouted(session, runtime, row)
            if row.state != "running":
                return Claim([], f"chunk is {row.state}")
            if row.owner == owner:
                if row.id in runtime.held():
                    return Claim([], "chunk is already being run by this worker")
                # This process claimed it in an earlier task that ended without handing it back (a failed
                # hand-back): nobody runs it, so the redelivered message takes it over now, not at lease end.
            elif owner_is_alive(session, row.owner, settings.worker_alive_seconds,
                                hostname=runtime.identity.hostname):
                return Claim([], f"chunk is held by live worker {row.owner}")
            first = chunk_ops.claim_chunk(session, chunk_id, owner, settings.lease_seconds, dead_owner=row.owner,
                                          model=runtime.model)
            if first is None:
                return Claim([], "another worker took the chunk first")
            log.warning("took over chunk %s from %s", chunk_id,
                        "an earlier task of this worker" if row.owner == owner else f"dead worker {row.owner}")
        if first.attempts > settings.max_chunk_attempts:
            chunk_ops.fail_chunk(session, first.id, f"chunk {first.index} was started {first.attempts - 1} "
                                                    "times without finishing (worker crashes or time limits)")
            return Claim([], "chunk failed after too many attempts")
        budget = settings.max_batch_interpretations - first.size
        more = chunk_ops.claim_more(session, owner, first.model, first.batch_key, budget, settings.lease_seconds,
                                    exclude=[first.id])
        return prepared(session, runtime, [first, *more])

    return unit_of_work(runtime.sessions, unit, settings.db_retry_seconds)


def prepared(session, runtime, claimed: list[chunk_ops.ClaimedChunk]) -> Claim:
    """What the run of `claimed` needs, read and recorded in the claim's transaction (reads and an insert that take
    no job lock: one commit fewer per engine run)."""
    inputs: dict[Any, Any] = {}
    for kind in dict.fromkeys(c.kind for c in claimed):  # what each kind's items need (prompts, vectors)
        inputs.update(get_kind(kind).load_inputs(session, [c for c in claimed if c.kind == kind]))
    # the variants the plans name, read with the chunks: a variant deleted after this fails its jobs in the run
    refs = variant_refs(session, [c.spec["variant"] for c in claimed if c.spec.get("variant") is not None])
    run_id = chunk_ops.record_engine_run(session, runtime.name, runtime.model, claimed)
    return Claim(claimed, inputs=inputs, run_id=run_id, variants=refs)


def _misrouted(session, runtime, row: Any) -> Claim:
    """A message for a chunk of another model: one sent while ``org/m`` and ``org_m`` still shared a queue (before
    `model_queue` told such names apart), or put on the wrong queue by hand, and this worker took it."""
    why = f"chunk is for model {row.model}, this worker serves {runtime.model}"
    if row.state != "queued":
        return Claim([], why)  # running or finished: its own model's workers and the reconciler have it
    if not live_workers(session, runtime.settings.worker_alive_seconds, model=row.model):
        # Nobody serves that model now: sending it on would only bring it back to this queue's workers at once.
        # It waits, queued, like any job of an unserved model; the reconciler re-sends it later.
        return Claim([], why + " (no live worker serves it; left to the reconciler)")
    return Claim([], why + " (sent on)", Redelivery(row.id, row.model, row.priority,
                                                          session.get(Job, row.job_id).kind))


def hand_back(runtime, claimed: list[chunk_ops.ClaimedChunk], reason: str, sender: TaskSender | None, *,
              started: bool = True) -> None:
    """Put chunks back in the queue and re-send their messages (`chunks.release_chunks`; `started=False`: they
    never ran, so their attempt is given back too)."""
    settings = runtime.settings
    priority = {c.id: c.priority for c in claimed}
    kind = {c.id: c.kind for c in claimed}

    def unit(session):
        return chunk_ops.release_chunks(session, list(priority), runtime.name, reason,
                                        max_attempts=settings.max_chunk_attempts, started=started)

    requeued = unit_of_work(runtime.sessions, unit, settings.db_retry_seconds)
    if sender is not None:
        for chunk_id in requeued:
            try:
                send_chunk(sender, chunk_id, runtime.model, priority[chunk_id], kind[chunk_id])
            except Exception:  # noqa: BLE001 - the reconciler re-sends queued chunks anyway
                log.exception("could not re-send chunk %s", chunk_id)


def outranked(runtime, claim: Claim) -> bool:
    """Whether a queued chunk of this model is more urgent than every chunk of `claim` (claimed ahead, before that
    chunk was submitted): the run is then not started and goes back (`ClaimAhead.give_back`), so an urgent job waits
    for the run under way only, not for the one claimed ahead of it too."""
    top = max(c.priority for c in claim.chunks)
    return unit_of_work(runtime.sessions, lambda session: chunk_ops.queued_priority(session, runtime.model),
                        runtime.settings.db_retry_seconds) > top


class ClaimAhead:
    """The next engine run of a batch key, claimed in a thread while the engine computes the current run, so that
    the engine starts it at once (a claim is a transaction of several round trips).

    Claimed only while the batch key heads the model's queue (the next queued chunk by priority, then first come, is
    of it): otherwise the task ends and the worker takes its next message, as the queue orders them. The chunks are
    held (their leases renewed, their own messages answered without a claim) from the claim on; if the current run
    fails they are handed back (`give_back`). A claim that fails leaves nothing claimed: the task just ends."""

    def __init__(self, runtime, batch_key: str):
        self.runtime = runtime
        self.batch_key = batch_key
        self._future = runtime.overlap.claim_ahead(self._claim_ahead)

    def _claim_ahead(self) -> Claim:
        runtime, settings = self.runtime, self.runtime.settings

        def unit(session) -> Claim:
            if chunk_ops.queue_head(session, runtime.model) != self.batch_key:
                return Claim([], "another batch key heads the queue")
            more = chunk_ops.claim_more(session, runtime.name, runtime.model, self.batch_key,
                                        settings.max_batch_interpretations, settings.lease_seconds)
            return prepared(session, runtime, more) if more else Claim([], "nothing more of this batch key")

        try:
            claim = unit_of_work(runtime.sessions, unit, settings.db_retry_seconds)
        except Exception:  # noqa: BLE001 - nothing was claimed (the transaction rolled back): the task just ends
            log.exception("claiming the next engine run ahead failed; taking the next message instead")
            return Claim([], "the claim failed")
        if claim.chunks:
            runtime.hold([c.id for c in claim.chunks], {c.id: c.job_id for c in claim.chunks})
        return claim

    def result(self) -> Claim:
        return self._future.result()

    def give_back(self, reason: str, sender: TaskSender | None) -> None:
        claim = self.result()
        if not claim.chunks:
            return
        try:
            hand_back(self.runtime, claim.chunks, reason, sender, started=False)
        finally:
            self.runtime.unhold([c.id for c in claim.chunks])
