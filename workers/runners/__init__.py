"""Runners: for each job kind (`selfie_jobs.kinds`), how its work items run on the resident engine.

A runner implements `workers.batcher.Runner`; the batcher picks the one of a plan's kind. A new kind adds one module
here and one line in `RUNNERS`.
"""

from __future__ import annotations

from typing import Any

from workers.runners.edits import EditRunner
from workers.runners.generate import GenerateRunner
from workers.runners.interpret import EngineRunner
from workers.runners.lenses import LensRunner
from workers.runners.vectors import VectorRunner

#: job kind -> runner class (built once per worker process over its resident engine)
RUNNERS: dict[str, type[EngineRunner]] = {"interpret": EngineRunner, "vectors": VectorRunner,
                                          "lenses": LensRunner, "generate": GenerateRunner, "supervised": EditRunner,
                                          "reinforce": EditRunner}


def build_runners(engine: Any, batch_size: int | None, watch: Any = None) -> dict[str, Any]:
    return {kind: cls(engine, batch_size, watch) for kind, cls in RUNNERS.items()}


__all__ = ["RUNNERS", "EditRunner", "EngineRunner", "GenerateRunner", "LensRunner", "VectorRunner", "build_runners"]
