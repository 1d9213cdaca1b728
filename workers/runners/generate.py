"""The `generate` kind's runner: each work item `(chunk id, prompt_index)` is its prompt generated on the resident
engine's model by `selfie_core.textgen.stream_generations` (left-padded batches, each row as it would be alone; a
sampled row seeded by the job's seed and its prompt index, so a job's samples do not depend on how its chunks were
batched with others').

`generate_texts` is the same code for a caller inside the worker (an edit's chat judge): prompts in, generations
out, in process, with an edit optionally swapped in.

The batcher checks every result's `relevancy` and `mean_relevancy` for finiteness; a generation has none (its
tokens are chosen from finite logits or not at all), so `GenerationResult` offers an empty list and 0.0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.batcher import WorkItem
from workers.runners.interpret import EngineRunner

#: rows per batch when neither the worker nor the engine sets one
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class GenerationResult:
    """A generation as the batcher and `GenerateKind.row_from` read it."""

    key: tuple[int, ...]
    text: str
    token_ids: tuple[int, ...]
    finish: str
    relevancy: list[float] = field(default_factory=list)
    mean_relevancy: float = 0.0


@dataclass(frozen=True)
class GenerationSettings:
    """A job spec's format and decoding, checked."""

    chat: bool
    system: str | None
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GenerationSettings:
        from selfie_core import SelfieInputError

        gen = spec.get("generation")
        chat, system = spec.get("chat"), spec.get("system")
        if not isinstance(gen, dict) or not isinstance(chat, bool) or not (system is None or isinstance(system, str)):
            raise SelfieInputError(f"invalid generation settings in the job spec: {spec!r}")
        try:
            out = cls(chat=chat, system=system, max_new_tokens=int(gen["max_new_tokens"]),
                      do_sample=bool(gen.get("do_sample", False)), temperature=float(gen.get("temperature", 1.0)),
                      top_p=float(gen.get("top_p", 1.0)),
                      seed=None if gen.get("seed") is None else int(gen["seed"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SelfieInputError(f"invalid generation settings in the job spec: {exc}") from exc
        if out.max_new_tokens < 1 or not out.temperature > 0 or not 0 < out.top_p <= 1:
            raise SelfieInputError(f"invalid generation settings in the job spec: {gen!r}")
        return out


def prompt_rows(engine: Any, prompts: Sequence[str], settings: GenerationSettings) -> list[list[int]]:
    """Each prompt's token ids as the model reads it (chat format or raw), lengths checked against the context."""
    from selfie_core.textgen import check_lengths, prompt_ids

    rows = [prompt_ids(engine.tokenizer, p, chat=settings.chat, system=settings.system) for p in prompts]
    check_lengths(rows, settings.max_new_tokens, engine.max_context)
    return rows


def stream(engine: Any, prompts: Sequence[str], settings: GenerationSettings, *, keys: Sequence[Any],
           indices: Sequence[int], batch_size: int | None, edit: Any = None, should_stop: Any = None,
           on_step: Any = None) -> Iterator[list[Any]]:
    """The generations of `prompts` (keys and prompt indices given per prompt), one list per engine batch."""
    from selfie_core.textgen import stream_generations

    rows = prompt_rows(engine, prompts, settings)
    size = batch_size or getattr(engine, "batch_size", None) or DEFAULT_BATCH_SIZE
    return stream_generations(engine.model, engine.tokenizer, rows, settings.max_new_tokens, keys=keys,
                              indices=indices, do_sample=settings.do_sample, temperature=settings.temperature,
                              top_p=settings.top_p, seed=settings.seed, batch_size=size, edit=edit,
                              should_stop=should_stop, on_step=on_step)


def generate_texts(engine: Any, prompts: Sequence[str], *, chat: bool = True, system: str | None = None,
                   max_new_tokens: int = 30, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int | None = None, edit: Any = None, batch_size: int | None = None) -> list[Any]:
    """Generate every prompt on `engine`'s model in process, as a `generate` job would (the same settings give the
    same tokens, prompt i seeded as a job's prompt i): a list of `selfie_core.textgen.GeneratedText` (text,
    token_ids, finish), in order. `edit`: an `MLPEdit` swapped in for the call (the model's own weights after)."""
    settings = GenerationSettings(chat=chat, system=system, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, top_p=top_p, seed=seed)
    indices = list(range(len(prompts)))
    return [g for batch in stream(engine, prompts, settings, keys=indices, indices=indices, batch_size=batch_size,
                                  edit=edit) for g in batch]


class GenerateRunner(EngineRunner):
    #: no interpretation prompt runs, so there is no baseline to store (workers.tasks asks runners for one)
    baseline = None

    def validate(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> None:
        prompt_rows(self.engine, [i.prompt for i in items], GenerationSettings.from_spec(spec))

    def stream(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> Iterator[list[Any]]:
        watch = self.watch  # the worker's: a cancel drops a closed job's rows between decode steps
        batches = stream(self.engine, [i.prompt for i in items], GenerationSettings.from_spec(spec),
                         keys=[i.key for i in items], indices=[i.key[1] for i in items], batch_size=self.batch_size,
                         should_stop=watch.should_stop if watch is not None else None,
                         on_step=watch.on_step if watch is not None else None)
        if watch is not None:
            batches = self._timed(batches, watch)
        for batch in batches:
            yield [GenerationResult(key=g.key, text=g.text, token_ids=g.token_ids, finish=g.finish) for g in batch]
