"""JSON request bodies as this API reads them: `selfie_jobs.jsontext.loads_strict` on every route.

Checked once here (`StrictJSONRoute`), not in each schema: whatever field a non-finite number, a lone surrogate or
a deep nest sits in (a known field, an extra one a detector config keeps), the body is refused with a 422 naming
where, before any schema or query sees it. `json_safe` keeps error answers encodable whatever they echo.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from selfie_jobs.jsontext import JSONTextError, encodable, loads_strict


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            doc = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads reads bytes
            try:
                self._json = loads_strict(doc)
            except JSONTextError as exc:
                # FastAPI answers a JSONDecodeError with a 422 `json_invalid` error that carries this message
                raise json.JSONDecodeError(str(exc), doc, 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `loads_strict` (FastAPI's documented custom-request pattern)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def json_safe(value: Any, depth: int = 0) -> Any:
    """`value` with what JSON cannot carry spelled out: a non-finite float or a string with a lone surrogate becomes
    its `repr`, anything else not JSON its `str`. For echoing client input in an error (the 422 lists each invalid
    value): an error answer that cannot be encoded turns into a 500."""
    if depth > 20:
        return "..."
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if encodable(value) else repr(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, dict):
        return {json_safe(str(k), depth + 1): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    return json_safe(str(value), depth + 1)
