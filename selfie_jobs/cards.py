"""Model cards (what a served model accepts) and worker heartbeats (who serves it, right now).

Workers write both; the API reads them, through this module only, to validate requests and to list the models that
live workers serve. Whether a worker is alive is `selfie_jobs.liveness`.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, defer
from tokenizers import Tokenizer

from selfie_jobs.chunks import as_utc, fail_job
from selfie_jobs.errors import SubmissionError
from selfie_jobs.liveness import GONE_WORKER_STATES, live_workers, pid_alive
from selfie_jobs.models import Job, ServedModel, Worker, utcnow
from selfie_jobs.states import FINAL_JOB_STATES

_CARD_COLUMNS = ("architecture", "num_layers", "hidden_size", "max_context")
#: Key of the card that holds a catalogued model's entry: {"path", "dtype", "added_at"}.
CATALOGUE_KEY = "catalogue"


def write_model_card(session: Session, name: str, card: dict[str, Any], *, now: datetime | None = None) -> ServedModel:
    """Insert or replace the card of the model served under `name` (the queue's model name).

    `card` is the engine's `model_card()` (plus whatever the worker adds, e.g. preset templates); the
    tokenizer JSON is kept in its own column because it is large and only read for validation.
    """
    now = now or utcnow()
    missing = [k for k in (*_CARD_COLUMNS, "tokenizer_json") if k not in card]
    if missing:
        raise ValueError(f"model card lacks {', '.join(missing)}")
    body = {k: v for k, v in card.items() if k != "tokenizer_json"}
    body.setdefault("name", name)
    row = session.get(ServedModel, name)
    if row is None:
        row = ServedModel(name=name)
        session.add(row)
    elif CATALOGUE_KEY not in body and CATALOGUE_KEY in (row.card or {}):
        body[CATALOGUE_KEY] = row.card[CATALOGUE_KEY]  # a worker's card keeps the model's catalogue entry
    row.architecture = str(card["architecture"])
    row.num_layers = int(card["num_layers"])
    row.hidden_size = int(card["hidden_size"])
    row.max_context = int(card["max_context"])
    row.card = body
    row.tokenizer_json = card["tokenizer_json"]
    row.updated_at = now
    session.flush()
    return row


_TOKENIZERS: dict[tuple[str, str], Tokenizer] = {}
_TOKENIZERS_LOCK = threading.Lock()


def card_tokenizer(card: ServedModel) -> Tokenizer:
    """The model's tokenizer, read and parsed once per card version (a tokenizer.json is megabytes of text,
    so `load_card` defers the column and it is only loaded here, on a cache miss)."""
    key = (card.name, card.updated_at.isoformat() if card.updated_at else "")
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        tokenizer = Tokenizer.from_str(card.tokenizer_json)
        with _TOKENIZERS_LOCK:
            for old in [k for k in _TOKENIZERS if k[0] == card.name]:
                del _TOKENIZERS[old]  # an older version of this card
            _TOKENIZERS[key] = tokenizer
    return tokenizer


def card_presets(card: ServedModel) -> dict[str, dict[str, Any]] | None:
    """Preset name -> what the card says about it ({} when it only lists names); None when the card is silent."""
    presets = (card.card or {}).get("presets")
    if presets is None:
        return None
    if isinstance(presets, dict):
        return {str(k): (v if isinstance(v, dict) else {}) for k, v in presets.items()}
    return {str(name): {} for name in presets}


def default_preset(card: ServedModel) -> str:
    info = card.card or {}
    if info.get("default_preset"):
        return str(info["default_preset"])
    presets = card_presets(card)
    if not presets or "summarize" in presets:
        return "summarize"
    return next(iter(presets))


def load_card(session: Session, model: str, alive_seconds: float | None = None) -> ServedModel:
    """The model's card. Without one: 503 with Retry-After while a live worker loads the model for the first time
    (its card is written when the load finishes, and the same submit then succeeds), else 422 naming what is served.
    `alive_seconds` (the heartbeat age that counts as live) turns the loading check on."""
    card = session.get(ServedModel, model, options=[defer(ServedModel.tokenizer_json)])
    if card is None and alive_seconds is not None:
        loading = loading_workers(session, model, alive_seconds)
        if loading:
            raise SubmissionError(
                f"model {model!r} is still loading on worker {', '.join(loading)} (first load: the checks this "
                f"request needs come with it); retry in {LOADING_RETRY_AFTER_SECONDS} s",
                field="model", status=503, retry_after=LOADING_RETRY_AFTER_SECONDS)
    if card is None:
        known = sorted(session.scalars(select(ServedModel.name)).all())
        hint = f"; served models: {', '.join(known)}" if known else "; no model is served yet (start a worker)"
        raise SubmissionError(f"unknown model {model!r}{hint}", field="model")
    return card


def read_model_card(session: Session, name: str) -> dict[str, Any] | None:
    """The card as written (tokenizer JSON included), or None for a model no worker ever loaded."""
    row = session.get(ServedModel, name)
    if row is None:
        return None
    return {**(row.card or {}), "name": row.name, "architecture": row.architecture, "num_layers": row.num_layers,
            "hidden_size": row.hidden_size, "max_context": row.max_context, "tokenizer_json": row.tokenizer_json}


#: Longest model name: the `served_models` column's, and what a job request's `model` may be.
MODEL_NAME_MAX = 200


def check_model_name(name: str) -> None:
    """ValueError unless a job request can name `name`: 1..MODEL_NAME_MAX printable characters, no surrounding
    blanks (an empty, blank, tab-holding or undecodable name would be listed but never requested)."""
    if not name or not name.strip():
        raise ValueError("a model name cannot be empty or blank")
    if len(name) > MODEL_NAME_MAX:
        raise ValueError(f"a model name has at most {MODEL_NAME_MAX} characters; this one has {len(name)}")
    if name != name.strip():
        raise ValueError(f"a model name cannot start or end with blanks: {name!r}")
    if not name.isprintable():  # control characters, and the surrogates of bytes that are not UTF-8
        raise ValueError(f"a model name is printable text; {name!r} is not")


def add_to_catalogue(session: Session, name: str, card: dict[str, Any], *, path: str, dtype: str,
                     now: datetime | None = None) -> ServedModel:
    """Make the model at `path` (a folder the workers can read, or a hub id) servable as `name`.

    `card` is computed from the model's config and tokenizer (`selfie_core.cardinfo.folder_card`), so the API
    validates jobs for it before any worker has loaded it; a worker that loads it replaces the card with its own
    and keeps this entry. Adding a name again replaces its entry and card (`selfie models add` asks for --replace).
    """
    check_model_name(name)
    now = now or utcnow()
    entry = {"path": path, "dtype": dtype, "added_at": now.isoformat()}
    return write_model_card(session, name, {**card, CATALOGUE_KEY: entry}, now=now)


def catalogue_entry(session: Session, name: str) -> dict[str, Any] | None:
    """{"path", "dtype", "added_at"} of a catalogued model, or None."""
    row = session.get(ServedModel, name, options=[defer(ServedModel.tokenizer_json)])
    return (row.card or {}).get(CATALOGUE_KEY) if row is not None else None


def load_source(session: Session, name: str, *, model_path: str | None = None,
                dtype: str | None = None) -> tuple[str | None, str]:
    """What `name` loads from and in which dtype: (folder or hub id, or None for `name` itself; dtype).

    An explicit `model_path` wins and skips the catalogue; else a model added with `selfie models add` loads from
    the folder (or hub id) recorded there. An explicit `dtype` wins, else the recorded one, else float32. The one
    rule for `selfie worker --model NAME` (workers.runtime) and `selfie interpret --model NAME` (selfie_cli.local).
    """
    entry = None if model_path else catalogue_entry(session, name)
    return model_path or (entry or {}).get("path"), dtype or (entry or {}).get("dtype") or "float32"


REMOVED_MODEL_ERROR = "the model was removed from the catalogue (selfie models remove) before the job finished"


def unfinished_jobs(session: Session, model: str) -> list[str]:
    """Ids of the jobs for `model` that are still queued or running."""
    return list(session.scalars(select(Job.id).where(Job.model == model, Job.state.not_in(FINAL_JOB_STATES))))


def remove_from_catalogue(session: Session, name: str, *, fail_unfinished: bool = False) -> bool:
    """Drop the catalogue entry and the card of `name` (False when it was not catalogued).

    Jobs still waiting for the model would wait for ever once no worker can load it: they are refused
    (CatalogueInUse) unless `fail_unfinished`, which fails each with `REMOVED_MODEL_ERROR`."""
    row = session.get(ServedModel, name, options=[defer(ServedModel.tokenizer_json)])
    if row is None or CATALOGUE_KEY not in (row.card or {}):
        return False
    waiting = unfinished_jobs(session, name)
    if waiting and not fail_unfinished:
        raise CatalogueInUse(name, len(waiting))
    for job_id in waiting:
        fail_job(session, job_id, REMOVED_MODEL_ERROR)
    session.delete(row)
    session.flush()
    return True


class CatalogueInUse(Exception):
    def __init__(self, name: str, jobs: int) -> None:
        super().__init__(f"{jobs} unfinished job(s) still wait for {name!r}; removing it would strand them")
        self.jobs = jobs


def catalogued_models(session: Session) -> dict[str, dict[str, Any]]:
    """Name -> catalogue entry, for every catalogued model."""
    rows = session.execute(select(ServedModel.name, ServedModel.card)).all()
    return {name: card[CATALOGUE_KEY] for name, card in rows if isinstance(card, dict) and CATALOGUE_KEY in card}


@dataclass(frozen=True)
class WorkerIdentity:
    name: str  # unique per worker process start: "<celery node name>:<pid>:<random>"; it is the chunk owner
    model: str
    hostname: str
    pid: int
    device: str


def worker_identity(node_name: str, model: str, device: str) -> WorkerIdentity:
    # Node name and pid repeat: a restarted container keeps its hostname and numbers its processes from 1 again.
    # The random part tells this process apart from its dead predecessor, whose chunks it must not take for its own.
    pid = os.getpid()
    return WorkerIdentity(f"{node_name}:{pid}:{secrets.token_hex(4)}", model, socket.gethostname(), pid, device)


def heartbeat(
    session: Session,
    who: WorkerIdentity,
    *,
    state: str = "ready",
    info: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> None:
    """Insert or refresh this worker's row. The caller commits."""
    now = now or utcnow()
    row = session.get(Worker, who.name)
    if row is None:
        row = Worker(name=who.name, model=who.model, hostname=who.hostname, pid=who.pid, device=who.device,
                     started_at=now)
        session.add(row)
    row.model = who.model
    row.device = who.device
    row.state = state
    row.last_heartbeat = now
    if info is not None:
        row.info = dict(info)
    session.flush()


def mark_worker(session: Session, name: str, state: str, *, now: datetime | None = None) -> None:
    session.execute(update(Worker).where(Worker.name == name).values(state=state, last_heartbeat=now or utcnow()))


def mark_dead_local_workers(session: Session, hostname: str | None = None, *, me: str | None = None) -> list[str]:
    """Mark rows of this host whose process is gone as dead (a killed worker process never says goodbye).

    `me`: the calling worker's own name. Another row with this process's pid is then an earlier process that had
    the same pid (a restarted container), and is dead too; without `me` such a row may be the caller's own.
    """
    hostname = hostname or socket.gethostname()
    dead = []
    for row in session.scalars(
        select(Worker).where(Worker.hostname == hostname, Worker.state.not_in(GONE_WORKER_STATES))
    ).all():
        if row.name == me:
            continue
        earlier_me = me is not None and row.pid == os.getpid()
        if earlier_me or (row.pid != os.getpid() and not pid_alive(row.pid)):
            row.state = "dead"
            dead.append(row.name)
    session.flush()
    return dead


def served_models(session: Session, alive_seconds: float, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """The models live workers serve and the catalogued ones, each with its card (without the tokenizer) and its
    live workers (none for a catalogued model no worker serves yet: jobs for it are validated and wait queued)."""
    workers = live_workers(session, alive_seconds, now=now)
    by_model: dict[str, list[Worker]] = {name: [] for name in catalogued_models(session)}
    for w in workers:
        by_model.setdefault(w.model, []).append(w)
    out = []
    for name, ws in sorted(by_model.items()):
        card = read_model_card(session, name) or {"name": name}
        card.pop("tokenizer_json", None)
        card["workers"] = [
            {"name": w.name, "device": w.device, "state": w.state, "last_heartbeat": as_utc(w.last_heartbeat),
             "info": w.info or {}}
            for w in ws
        ]
        out.append(card)
    return out


#: Seconds a submit for a model that is loading for the first time (no card yet) is asked to wait before it retries.
LOADING_RETRY_AFTER_SECONDS = 10


def wait_reason(session: Session, model: str, alive_seconds: float, *, now: datetime | None = None) -> str | None:
    """Why work for `model` is not being served right now, or None when a live worker is ready for it.

    What a queued job's status shows: the model is loading on a worker, every worker of it failed to load (with
    the error), or no live worker serves it at all.
    """
    workers = live_workers(session, alive_seconds, model=model, now=now)
    if any(w.state == "ready" for w in workers):
        return None
    loading = [w.name for w in workers if w.state == "loading"]
    if loading:
        return f"waiting for model {model!r} to load on worker {', '.join(loading)}"
    # A worker that failed to load is gone from the live ones, but its row says why until it tries again.
    failed = session.scalars(
        select(Worker).where(Worker.model == model, Worker.state == "load_failed",
                             Worker.last_heartbeat >= (now or utcnow()) - timedelta(seconds=alive_seconds))
        .order_by(Worker.last_heartbeat.desc()).limit(1)
    ).first()
    if failed is not None:
        error = (failed.info or {}).get("error") or "no error recorded"
        return f"model {model!r} failed to load on worker {failed.name} ({error}); it tries again with backoff"
    return f"no live worker serves model {model!r}; start one (`selfie worker --model {model}`)"


def loading_workers(session: Session, model: str, alive_seconds: float) -> list[str]:
    """Names of the live workers loading `model` now."""
    return [w.name for w in live_workers(session, alive_seconds, model=model) if w.state == "loading"]
