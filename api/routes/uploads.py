"""POST /v1/jobs/vectors/upload: a `vectors` job whose vectors come as a `.npy` or `.safetensors` file.

The file is read here (numpy, no torch, never pickle: `api.vector_files`), up to `max_vector_upload_bytes`; the
other fields of the request come as the `options` form field (the JSON of a `vectors` request without `vectors`),
and the whole is validated and submitted exactly as `POST /v1/jobs/vectors` is.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile, status
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SenderDep, SessionDep, SettingsDep
from api.routes.jobs import SUBMIT_RESPONSES, submit
from api.schemas import ErrorOut, JobAccepted
from api.vector_files import VectorFileError, check_name, read_vectors
from selfie_jobs.errors import DomainError
from selfie_jobs.jsontext import JSONTextError, loads_strict
from selfie_jobs.kinds.vectors import VectorJobCreate

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

READ_BLOCK = 1 << 20


def _refusal(status_code: int, message: str, field: str) -> DomainError:
    return DomainError(message, field=field, status=status_code)


async def _read_limited(upload: UploadFile, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than `limit` (read no further than that)."""
    parts, size = [], 0
    while block := await upload.read(READ_BLOCK):
        size += len(block)
        if size > limit:
            return None
        parts.append(block)
    return b"".join(parts)


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors()[:5])


@router.post(
    "/vectors/upload",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={**SUBMIT_RESPONSES, 415: {"model": ErrorOut, "description": "Not a .npy or .safetensors file (a "
                                         "pickle such as .pt is refused: loading it would run its code)."}},
    summary="Submit a vectors job from a .npy or .safetensors file",
)
async def upload_vectors_job(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    who: PrincipalDep,
    sender: SenderDep,
    file: Annotated[UploadFile, File(description=".npy (n, hidden_size) or .safetensors with one such tensor")],
    options: Annotated[str, Form(max_length=1 << 20, description="JSON: the vectors request without 'vectors' "
                                 "(model, labels, template, k, max_new_tokens, ...)")] = "{}",
    tensor: Annotated[str | None, Form(max_length=200, description="The tensor to use in a .safetensors file "
                                       "holding several.")] = None,
):
    try:
        suffix = check_name(file.filename)
    except VectorFileError as exc:
        raise _refusal(exc.status, exc.message, "file") from None
    try:  # read as every JSON body is (api.bodies): no NaN/Infinity, lone surrogates or deep nests
        fields = loads_strict(options, root="options")
    except JSONTextError as exc:
        raise _refusal(422, str(exc), "options") from None
    except ValueError as exc:
        raise _refusal(422, f"options is not JSON: {exc}", "options") from None
    if not isinstance(fields, dict):
        raise _refusal(422, "options must be a JSON object", "options")
    if "vectors" in fields or "expressions" in fields:
        raise _refusal(422, "the vectors come from the file: leave 'vectors' and 'expressions' out of options",
                       "options")
    data = await _read_limited(file, settings.max_vector_upload_bytes)
    if data is None:
        raise _refusal(413, f"the file is larger than {settings.max_vector_upload_bytes} bytes "
                            "(SELFIE_MAX_VECTOR_UPLOAD_BYTES)", "file")
    try:
        array = read_vectors(data, suffix, tensor)
    except VectorFileError as exc:
        raise _refusal(exc.status, exc.message, "file") from None
    if array.shape[0] > settings.max_vectors_per_job:
        raise _refusal(413, f"the file holds {array.shape[0]} vectors; at most {settings.max_vectors_per_job} per "
                            "job (split it into several jobs)", "file")
    try:
        body = VectorJobCreate.model_validate({**fields, "vectors": array.tolist()})
    except ValidationError as exc:
        raise _refusal(422, _validation_message(exc), "options") from None
    # The database work is synchronous, as in the JSON routes: run it off the event loop.
    return await run_in_threadpool(submit, body, request, response, session, settings, who, sender)
