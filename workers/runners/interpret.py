"""The `interpret` kind's runner: (prompt, layer, token) work items as `InterpretRequest`s on the resident engine.

`EngineRunner` is also the base of the other kinds' runners: the engine settings of a job spec (template, injection,
generation) and the failure classification (input error, out of memory, device failure) are the same for every kind;
a kind changes only how its work items become engine requests (`requests`).
"""

from __future__ import annotations

import gc
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from workers.batcher import WorkItem

_DEVICE_FAILURE_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "cuda error",
    "cudaerror",
    "cublas_status_execution_failed",
    "misaligned address",
)


def spec_template(spec: dict[str, Any] | None, tokenizer: Any) -> Any:
    """The `InterpretationTemplate` of a stored template spec (`{"preset", "system"}` or `{"parts"}`).

    A preset spec without a "system" key was stored when presets rendered the chat template's own default system
    prompt: it renders so still, and the job runs the prompt it was submitted with."""
    from selfie_core import InterpretationTemplate

    tpl = spec or {"preset": "summarize"}
    if "preset" in tpl:
        return InterpretationTemplate.preset(tpl["preset"], tokenizer, system=tpl.get("system"),
                                             tokenizer_default_system="system" not in tpl)
    return InterpretationTemplate.from_dict(tpl)


class EngineRunner:
    """Runs work items on the resident `SelfieEngine` (the model-runner side of the batcher's Runner)."""

    #: Engine settings kept per distinct job spec. Seeds, temperatures and custom templates are part of the spec,
    #: so a long-lived worker sees an unbounded number of them: only the most recently used are kept.
    MAX_CONFIGS = 64

    def __init__(self, engine: Any, batch_size: int | None = None, watch: Any = None):
        self.engine = engine
        self.batch_size = batch_size
        self.watch = watch  # the worker's BatchWatch (None: the engine runs unwatched, as in unit tests)
        self._configs: OrderedDict[str, tuple[Any, Any, Any]] = OrderedDict()

    def configs(self, spec: dict[str, Any]) -> tuple[Any, Any, Any]:
        from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, SelfieInputError

        key = json.dumps(spec, sort_keys=True)
        if key in self._configs:
            self._configs.move_to_end(key)
        else:
            try:
                template = spec_template(spec.get("template"), getattr(self.engine, "tokenizer", None))
                injection = InjectionConfig.from_dict(spec.get("injection") or {})
                generation = GenerationConfig.from_dict(spec.get("generation") or {})
            except SelfieInputError:
                raise
            except (TypeError, ValueError, KeyError) as exc:
                raise SelfieInputError(f"invalid engine settings in the job spec: {exc}") from exc
            self._configs[key] = (template, injection, generation)
            if len(self._configs) > self.MAX_CONFIGS:
                self._configs.popitem(last=False)
        return self._configs[key]

    @staticmethod
    def requests(items: Sequence[WorkItem]) -> list[Any]:
        from selfie_core import InterpretRequest

        return [InterpretRequest(prompt=i.prompt, layer=i.key[2], token=i.key[3], key=i.key) for i in items]

    def validate(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> None:
        template, injection, generation = self.configs(spec)
        self.engine.validate(self.requests(items), template, injection, generation)

    def stream(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> Iterator[list[Any]]:
        template, injection, generation = self.configs(spec)
        # specs stored before grounding existed have none: the default
        return self.engine_stream(self.requests(items), template, injection, generation, spec.get("grounding"))

    def engine_stream(self, requests: list[Any], template: Any, injection: Any, generation: Any,
                      grounding: Any = None) -> Iterator[list[Any]]:
        """The engine's batches, watched when the worker set a `watch` (`workers.progress.BatchWatch`): its
        cancel check between decode steps and batches, its progress and measured rate."""
        watch = self.watch
        if watch is None:
            return self.engine.stream(requests, template=template, injection=injection, generation=generation,
                                      batch_size=self.batch_size, grounding=grounding)
        batches = self.engine.stream(requests, template=template, injection=injection, generation=generation,
                                     batch_size=self.batch_size, grounding=grounding, should_stop=watch.should_stop,
                                     on_step=watch.on_step)
        return self._timed(batches, watch)

    @staticmethod
    def _timed(batches: Iterator[list[Any]], watch: Any) -> Iterator[list[Any]]:
        watch.batch_started()
        for batch in batches:
            watch.batch_done(len(batch))
            yield batch

    def baseline(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The job spec's baseline (`SelfieEngine.baseline`, kept by the engine) as stored with the job."""
        template, _, generation = self.configs(spec)
        return self.engine.baseline(template, generation).to_dict()

    def is_input_error(self, exc: BaseException) -> bool:
        from selfie_core import SelfieInputError

        return isinstance(exc, SelfieInputError)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
        return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()

    def is_device_failure(self, exc: BaseException) -> bool:
        import torch

        if self.is_out_of_memory(exc):
            return False
        accelerator_error = getattr(torch, "AcceleratorError", None)
        if accelerator_error is not None and isinstance(exc, accelerator_error):
            return True
        text = str(exc).lower()
        return isinstance(exc, RuntimeError) and any(m in text for m in _DEVICE_FAILURE_MARKERS)

    def free_memory(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
