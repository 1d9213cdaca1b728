"""Model edits from the client (`Client.edit_supervised`, `Client.edit_reinforce`): submit an edit job (POST
/v1/edits/...), and optionally wait for it and return the variant it stored (its settings, losses per epoch and
evaluations on the base model and on the variant; see docs/architecture.md)."""

from __future__ import annotations

import csv
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def facts_from_csv(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Facts for an edit's knowledge-preservation check from a CSV with ``prompt`` and ``attribute`` columns (the
    original SelfIE code's ``filtered_known_1000_with_output.csv`` and the project's own ``facts.csv`` have them;
    other columns are ignored), the first ``limit`` rows if given."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"prompt", "attribute"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: a facts CSV needs 'prompt' and 'attribute' columns; it has "
                             f"{', '.join(reader.fieldnames or ()) or 'none'}")
        facts = [{"prompt": row["prompt"], "attribute": row["attribute"]} for row in reader]
    facts = facts[:limit] if limit is not None else facts
    if not facts:
        raise ValueError(f"{path}: no facts in the file")
    return facts


def behaviours_from_file(path: str | Path, limit: int | None = None) -> list[str]:
    """Requests for an edit's harmful-behaviour check, one per line (the original's
    ``transfer_expriment_behaviors.csv``), the first ``limit`` if given."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = lines[:limit] if limit is not None else lines
    if not lines:
        raise ValueError(f"{path}: no requests in the file")
    return lines


def evaluations(*, knowledge: bool | Sequence[dict[str, str]] = False, behaviours: Sequence[str] | None = None,
                detector: dict[str, Any] | None = None, behaviour_tokens: int | None = None) -> dict[str, Any]:
    """An edit's ``evaluations`` option: ``knowledge=True`` (the built-in facts) or a list of facts
    (`facts_from_csv`); ``behaviours`` (requests, `behaviours_from_file`) with the ``detector`` that flags a
    harmful response (an audit detector config, e.g. ``{"kind": "keywords", "words": [...]}``)."""
    out: dict[str, Any] = {}
    if knowledge is True:
        out["knowledge"] = {}
    elif knowledge:
        out["knowledge"] = {"facts": list(knowledge)}
    if behaviours is not None:
        if detector is None:
            raise ValueError("the behaviour check needs a detector that flags a harmful response")
        out["behaviour"] = {"requests": list(behaviours), "detector": detector,
                            **({"max_new_tokens": behaviour_tokens} if behaviour_tokens is not None else {})}
    return out


def state_ref(prompt: str, layer: int, token: int) -> dict[str, Any]:
    """``hidden_states[layer][token]`` of ``prompt``, as an edit's source or target."""
    return {"prompt": prompt, "layer": layer, "token": token}


class EditsMixin:
    """The edit methods of `selfie_client.Client` (which gives `_request` and `_final`)."""

    def _edit(self, path: str, body: dict[str, Any], wait: bool, progress: bool, timeout: float | None,
              poll: float) -> dict[str, Any]:
        body = {k: v for k, v in body.items() if v is not None}
        body["idempotency_key"] = body.get("idempotency_key") or "client-" + uuid.uuid4().hex
        accepted = self._request("POST", path, json=body).json()  # type: ignore[attr-defined]
        if not wait:
            return accepted
        self._final(accepted, progress=progress, poll=poll, timeout=timeout)  # type: ignore[attr-defined]
        return self.edit_result(accepted["id"])

    def edit_result(self, job_id: str) -> dict[str, Any]:
        """The variant an edit job stored (None while it trains), with its epochs so far under ``epochs``."""
        epochs: list[dict[str, Any]] = []
        variant = None
        cursor = None
        while True:
            params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            page = self._request("GET", f"/v1/jobs/{job_id}/results", params=params).json()  # type: ignore[attr-defined]
            epochs.extend(page["items"])
            variant = page.get("variant")
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return {"job_id": job_id, "variant": variant, "epochs": epochs}

    def edit_supervised(self, source: dict[str, Any], *, target: dict[str, Any] | None = None,
                        target_vector: Sequence[float] | None = None, reference_texts: Sequence[str] | None = None,
                        wait: bool = True, progress: bool = True, timeout: float | None = None, poll: float = 0.5,
                        **options: Any) -> dict[str, Any]:
        """Supervised Control: move ``source`` (`state_ref(prompt, layer, token)`) to ``target`` (another state)
        or ``target_vector`` (hidden-size floats). Options: beta, epochs, lr, anchor ("original" or "current"),
        refs_per_epoch, seed, evaluations, model, priority, ... (POST /v1/edits/supervised). With ``wait``, returns
        {"job_id", "variant", "epochs"} once it finished; else the accepted job."""
        vector = None if target_vector is None else [float(v) for v in target_vector]
        body = {"source": source, "target": target, "target_vector": vector,
                "reference_texts": None if reference_texts is None else list(reference_texts), **options}
        return self._edit("/v1/edits/supervised", body, wait, progress, timeout, poll)

    def edit_reinforce(self, prompt: str, layer: int, judge: dict[str, Any], *, wait: bool = True,
                       progress: bool = True, timeout: float | None = None, poll: float = 0.5,
                       **options: Any) -> dict[str, Any]:
        """Reinforcement Control: push the states of ``prompt`` at ``layer`` away from what ``judge`` rejects
        ({"type": "keywords", "words": [...]}, "regex", "concepts", or {"type": "model"}: the model judges its own
        interpretations). Options: epochs, lr, k, max_new_tokens, template, seed, evaluations, model, ...
        (POST /v1/edits/reinforce). With ``wait``, returns {"job_id", "variant", "epochs"}; else the job."""
        return self._edit("/v1/edits/reinforce", {"prompt": prompt, "layer": layer, "judge": judge, **options},
                          wait, progress, timeout, poll)
