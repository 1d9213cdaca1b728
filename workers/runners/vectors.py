"""The `vectors` kind's runner: a user's vectors, or expressions over hidden states extracted here, interpreted as
`VectorRequest`s on the resident engine.

A work item's payload is `{"values": [...]}` (a vector as submitted) or `{"terms": [{"coef", "prompt", "layer",
"token"}, ...]}` (the vector is the sum of coef * hidden_states[layer][token] of each prompt, extracted by
`SelfieEngine.hidden_states` in one forward per prompt batch). Each result carries the norm of the vector that was
interpreted, which only the worker knows for an expression.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.batcher import WorkItem
from workers.runners.interpret import EngineRunner


@dataclass(frozen=True)
class VectorResult:
    """An engine result with the interpreted vector's label and norm (what `VectorsKind.row_from` stores)."""

    key: tuple[int, ...]
    label: str
    norm: float
    text: str
    token_ids: list[int] = field(default_factory=list)
    relevancy: list[float] = field(default_factory=list)
    mean_relevancy: float = 0.0


def vector_norm(vector: Any) -> float:
    """The vector's L2 norm, summed in float64: in float32 the squares of values past ~1.8e19 overflow and a finite
    vector of norm 2.4e21 was stored with norm infinity (read back as null)."""
    return float(vector.double().norm())


class VectorRunner(EngineRunner):
    def vectors(self, items: Sequence[WorkItem]) -> list[Any]:
        """Each item's vector as a float32 tensor: submitted values as they are, expressions summed from states."""
        import torch

        wanted: dict[str, set[tuple[int, int]]] = {}
        for item in items:
            for term in (item.payload or {}).get("terms", ()):
                wanted.setdefault(term["prompt"], set()).add((term["layer"], term["token"]))
        states = self.engine.hidden_states({p: sorted(pairs) for p, pairs in wanted.items()}) if wanted else {}
        out = []
        for item in items:
            payload = item.payload or {}
            if "values" in payload:
                out.append(torch.as_tensor(payload["values"], dtype=torch.float32))
                continue
            total = None
            for term in payload.get("terms", ()):
                state = states[term["prompt"]][(term["layer"], term["token"])].detach().float().cpu()
                part = float(term["coef"]) * state
                total = part if total is None else total + part
            out.append(total)
        return out

    def requests(self, items: Sequence[WorkItem]) -> list[Any]:  # type: ignore[override]
        from selfie_core import VectorRequest

        return [VectorRequest(vector=v, key=i.key, label=i.prompt) for i, v in zip(items, self.vectors(items))]

    def stream(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> Iterator[list[Any]]:
        template, injection, generation = self.configs(spec)
        requests = self.requests(items)
        norms = {r.key: vector_norm(r.vector) for r in requests}
        labels = {i.key: i.prompt for i in items}
        for batch in self.engine_stream(requests, template, injection, generation):
            yield [VectorResult(key=r.key, label=labels[r.key], norm=norms[r.key], text=r.text,
                                token_ids=list(r.token_ids), relevancy=list(r.relevancy),
                                mean_relevancy=r.mean_relevancy) for r in batch]
