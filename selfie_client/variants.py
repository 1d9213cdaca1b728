"""The client's model-variant calls (a mixin of `Client`): list, read and delete the variants edit jobs made.

A job runs on a variant when its submit names it: `client.interpret(..., variant=vid)`, and likewise
`interpret_vectors` and `lenses`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class VariantMethods:
    """`Client`'s variant calls; `_request` is the client's (retries, errors as `SelfieError`)."""

    def _request(self, method: str, path: str, **kw: Any) -> Any:  # pragma: no cover - Client's
        raise NotImplementedError

    def iter_variants(self, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every variant the key may see, newest first (id, job_id, model, method, layer, created_at, link)."""
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": page_size, **({"cursor": cursor} if cursor else {})}
            body = self._request("GET", "/v1/variants", params=params).json()
            yield from body["variants"]
            cursor = body["next_cursor"]
            if not cursor:
                return

    def variants(self) -> list[dict[str, Any]]:
        """The key's variants, newest first (all pages)."""
        return list(self.iter_variants())

    def variant(self, variant_id: str) -> dict[str, Any]:
        """One variant: base model, layer, method, sha256, the edit's settings, its losses per epoch and its
        evaluations (base model against variant), the edit job's id and link."""
        return self._request("GET", f"/v1/variants/{variant_id}").json()

    def delete_variant(self, variant_id: str) -> dict[str, Any]:
        """Delete a variant and its weights: jobs that name it afterwards are refused (queued ones fail)."""
        return self._request("DELETE", f"/v1/variants/{variant_id}").json()
