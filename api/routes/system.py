"""/v1/models (what live workers serve, and the model catalogue), /healthz (the process answers), /readyz (database
and Redis answer)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import defer

from api.bodies import StrictJSONRoute
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.schemas import ErrorOut, Health, ModelList, ModelOut, Ready, Tokenized, WorkerOut
from selfie_jobs.errors import DomainError, NotFound
from selfie_jobs.models import ServedModel
from selfie_jobs.queries import live_models
from selfie_jobs.cards import card_tokenizer

router = APIRouter(route_class=StrictJSONRoute)

_CARD_FIELDS = ("name", "architecture", "num_layers", "hidden_size", "max_context", "presets", "workers")


@router.get("/v1/models", response_model=ModelList, tags=["models"],
            summary="Models served by live workers, and catalogued ones (selfie models add)",
            responses={401: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def get_models(session: SessionDep, settings: SettingsDep, who: PrincipalDep) -> ModelList:  # noqa: ARG001
    out = []
    for card in live_models(session, settings.worker_alive_seconds):
        presets = card.get("presets") or []
        out.append(ModelOut(
            name=card["name"],
            architecture=card.get("architecture"),
            num_layers=card.get("num_layers"),
            hidden_size=card.get("hidden_size"),
            max_context=card.get("max_context"),
            presets=sorted(presets) if isinstance(presets, (list, dict)) else [],
            workers=[WorkerOut(name=w["name"], device=w["device"], state=w["state"],
                               devices=(w.get("info") or {}).get("devices") or [w["device"]],
                               last_heartbeat=w.get("last_heartbeat")) for w in card.get("workers", [])],
            card={k: v for k, v in card.items() if k not in _CARD_FIELDS},
        ))
    return ModelList(models=out)


# {name:path}: model names may hold "/" (hub ids such as org/name, catalogue names)
@router.get("/v1/models/{name:path}/tokenize", response_model=Tokenized, tags=["models"],
            summary="A text's tokens as the model sees them (the token indices jobs refer to)",
            responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def tokenize(name: str, text: Annotated[str, Query(max_length=20_000)], session: SessionDep,
             who: PrincipalDep) -> Tokenized:  # noqa: ARG001
    card = session.get(ServedModel, name, options=[defer(ServedModel.tokenizer_json)]) if "\x00" not in name else None
    if card is None:
        raise NotFound(f"no model card for {name!r}")
    tokenizer = card_tokenizer(card)
    ids = tokenizer.encode(text).ids
    return Tokenized(model=name, ids=ids, tokens=tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False))


@router.get("/v1/models/{name:path}/detokenize", response_model=Tokenized, tags=["models"],
            summary="Token ids as text, one string per id (e.g. an interpretation's generated tokens)",
            responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 422: {"model": ErrorOut},
                       503: {"model": ErrorOut}})
def detokenize(name: str, ids: Annotated[str, Query(max_length=20_000, pattern=r"^[0-9]{1,9}(,[0-9]{1,9})*$",
                                                    description="Comma-separated token ids.")],
               session: SessionDep, who: PrincipalDep) -> Tokenized:  # noqa: ARG001
    card = session.get(ServedModel, name, options=[defer(ServedModel.tokenizer_json)]) if "\x00" not in name else None
    if card is None:
        raise NotFound(f"no model card for {name!r}")
    tokenizer = card_tokenizer(card)
    values = [int(i) for i in ids.split(",")]
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if any(i >= vocab for i in values):
        raise DomainError(f"token ids must be below the vocabulary size of {name!r} ({vocab})", field="ids")
    return Tokenized(model=name, ids=values,
                     tokens=tokenizer.decode_batch([[i] for i in values], skip_special_tokens=False))


@router.get("/healthz", response_model=Health, tags=["health"])
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, tags=["health"], responses={503: {"model": Ready}})
def readyz(request: Request, session: SessionDep):
    database = redis_state = "ok"
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        database = f"error: {type(exc).__name__}"
    try:
        if not request.app.state.redis_ping():
            redis_state = "error: no answer"
    except Exception as exc:  # noqa: BLE001
        redis_state = f"error: {type(exc).__name__}"
    ready = database == "ok" and redis_state == "ok"
    body = Ready(status="ready" if ready else "not ready", database=database, redis=redis_state)
    if ready:
        return body
    return JSONResponse(status_code=503, content=body.model_dump(), headers={"Retry-After": "5"})
