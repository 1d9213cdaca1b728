"""The `lenses` kind's runner: (prompt, layer, token) work items read by `selfie_core.lenses.run_lenses` on the
resident engine (the logit lens, the identity patch and the model's own prediction, per the job's spec).

The batcher checks every result's `relevancy` and `mean_relevancy` for finiteness before it is stored; a lens reading
has no relevancy, so `LensResult` offers its probabilities there: a non-finite probability (a state or model output
that is not finite) fails the job as a non-finite relevancy does for the other kinds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from workers.batcher import WorkItem
from workers.runners.interpret import EngineRunner


@dataclass(frozen=True)
class LensResult:
    """An engine lens reading as the batcher and `LensesKind.row_from` read it."""

    reading: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reading, name)

    @property
    def relevancy(self) -> list[float]:
        r = self.reading
        return [p for top in (r.model, r.logit, r.identity) if top is not None for p in top.probs]

    @property
    def mean_relevancy(self) -> float:
        return float(self.reading.model.probs[0])


class LensRunner(EngineRunner):
    #: no interpretation prompt runs, so there is no baseline to store (workers.tasks asks runners for one)
    baseline = None

    @staticmethod
    def requests(items: Sequence[WorkItem]) -> list[Any]:  # type: ignore[override]
        from selfie_core.lenses import LensRequest

        return [LensRequest(prompt=i.prompt, layer=i.key[2], token=i.key[3], key=i.key) for i in items]

    def validate(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> None:
        # run_lenses checks everything before it runs anything; the generator it returns is dropped unstarted
        from selfie_core.lenses import run_lenses

        run_lenses(self.engine, self.requests(items), **self._settings(spec))

    def stream(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> Iterator[list[Any]]:
        from selfie_core.lenses import run_lenses

        watch = self.watch  # the worker's: a cancel drops a closed job's rows before the next lens batch
        batches = run_lenses(self.engine, self.requests(items), batch_size=self.batch_size,
                             should_stop=watch.should_stop if watch is not None else None, **self._settings(spec))
        if watch is not None:
            batches = self._timed(batches, watch)
        for batch in batches:
            yield [LensResult(r) for r in batch]

    @staticmethod
    def _settings(spec: dict[str, Any]) -> dict[str, Any]:
        from selfie_core import SelfieInputError

        lenses, top_k = spec.get("lenses"), spec.get("top_k")
        if not isinstance(lenses, list) or not isinstance(top_k, int):
            raise SelfieInputError(f"invalid lens settings in the job spec: {spec!r}")
        return {"lenses": lenses, "top_k": top_k}
