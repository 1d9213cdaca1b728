"""The `generate` kind: plain generation of prompts on the served model (no injection, no interpretation), each
prompt as one user turn in the model's chat template with the generation prompt (`chat`, the default) or as raw text,
greedy or sampled with the decoding options of interpret jobs (a seeded sample is the same every time: each prompt
draws from a generator seeded by the job's seed and the prompt's index, whatever its batch).

Request: `GenerateJobCreate`: the engine fields every kind shares (`EngineJobFields`: model, priority, idempotency,
time to live, `max_new_tokens`, `decoding`), `prompts`, `chat`, `system`; the interpretation's own options
(template, injection, grounding) are refused. Validated against the model card here (no torch): the caps of
interpret's prompts, a chat template when `chat`, the prompts' length with the chat turn's tokens and max_new_tokens
against the context. Items: `[prompt_index]`. Inputs: the job's prompts (`prompts` table, as interpret stores them).
Results: `generations`, unique per (job, prompt_index): text, token_ids, finish ("eos" or "length").
Runner: `workers.runners.generate` (`selfie_core.textgen.stream_generations`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from selfie_jobs.cards import card_presets, card_tokenizer, default_preset, load_card
from selfie_jobs.errors import SubmissionError
from selfie_jobs.kinds import PreparedJob, ResultPage
from selfie_jobs.kinds.interpret import InterpretKind
from selfie_jobs.models import Generation
from selfie_jobs.specs import (MAX_SYSTEM_CHARS, Bool, EngineJobFields, Prompts, SafeStr, refuse_fields,
                               schema_without, spec_batch_key, with_variant)

#: what an interpretation request sets about injecting and judging, which a plain generation does not do
INTERPRETATION_FIELDS = ("template", "k", "injection_mode", "injection_strength", "grounding")
FINISHES = ("eos", "length")


#: examples of the request's OpenAPI schema
EXAMPLES = [
    {"model": "smollm2-135m-instruct", "prompts": ["What is the capital of France?"], "max_new_tokens": 20},
    {"prompts": ["The Eiffel Tower is located in"], "chat": False, "max_new_tokens": 8,
     "decoding": {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "seed": 7}},
]


class GenerateJobCreate(EngineJobFields):
    """A request to generate the model's continuation of each prompt (in its chat format, or raw)."""

    # the interpretation options it inherits and refuses are left out of its schema
    model_config = EngineJobFields.model_config | {"json_schema_extra": schema_without(INTERPRETATION_FIELDS,
                                                                                         EXAMPLES)}

    prompts: Prompts = Field(description="One prompt or a list of prompts.")
    chat: Bool = Field(True, description="Each prompt as one user turn in the model's chat template, with the "
                                         "assistant's turn opened (true); or the prompt's raw text (false).")
    system: Annotated[SafeStr, Field(min_length=1, max_length=MAX_SYSTEM_CHARS)] | None = Field(
        None, description="A system prompt for the chat format (none by default: no system turn).")

    @model_validator(mode="before")
    @classmethod
    def _nothing_injected(cls, data: Any) -> Any:
        # an interpretation's options would be accepted and ignored: refused, so nobody believes them
        return refuse_fields(data, INTERPRETATION_FIELDS,
                             "a generate job injects and interprets nothing: {fields} do(es) not apply to it")

    @model_validator(mode="after")
    def _system_with_chat(self) -> GenerateJobCreate:
        if self.system is not None:
            if not self.chat:
                raise ValueError("'system' goes with the chat format; a raw prompt (chat=false) has no system turn")
            if not self.system.strip():
                raise ValueError("'system' is blank; leave it out for no system prompt")
            if any("\ue000" <= c <= "\ue002" for c in self.system):
                raise ValueError("'system' must not contain the private-use characters U+E000..U+E002")
        return self


def generation_spec(request: GenerateJobCreate) -> dict[str, Any]:
    """The stored `jobs.spec`: the prompts' format and the decoding. A greedy job's sampling options change
    nothing, so they are stored as their defaults and greedy jobs of one format share batches."""
    decoding = request.decoding
    sampled = decoding.do_sample
    return with_variant(request, {
        "chat": request.chat,
        "system": request.system,
        "generation": {
            "max_new_tokens": request.max_new_tokens,
            "do_sample": sampled,
            "temperature": float(decoding.temperature) if sampled else 1.0,
            "top_p": float(decoding.top_p) if sampled else 1.0,
            "seed": decoding.seed if sampled else None,
        },
    })


@dataclass(frozen=True)
class GenerationRow:
    """One generation ready to be stored."""

    TABLE: ClassVar[type] = Generation
    ITEM_COLUMNS: ClassVar[tuple[str, ...]] = ("prompt_index",)

    prompt_index: int
    text: str
    token_ids: list[int]
    finish: str

    @property
    def item(self) -> tuple[int]:
        return (self.prompt_index,)

    def values(self, storable: Any) -> dict[str, Any]:
        return {"prompt_index": self.prompt_index, "text": storable(self.text), "token_ids": list(self.token_ids),
                "finish": self.finish}


class GenerateKind(InterpretKind):
    """Prompts stored and read back as the interpret kind's; its own request, plan, rows and table."""

    name = "generate"
    request = GenerateJobCreate
    table = Generation
    item_columns = GenerationRow.ITEM_COLUMNS
    noun = "generations"
    csv_columns = ("prompt_index", "text", "finish", "token_ids", "worker", "model", "created_at")

    def prepare(self, session: Session, request: GenerateJobCreate, settings: Any) -> PreparedJob:
        model = request.model or settings.default_model
        if len(request.prompts) > settings.max_prompts_per_job:
            raise SubmissionError(f"{len(request.prompts)} prompts; at most {settings.max_prompts_per_job} per job",
                                  field="prompts")
        for i, prompt in enumerate(request.prompts):
            if len(prompt) > settings.max_prompt_chars:
                raise SubmissionError(f"prompt {i} has {len(prompt)} characters; at most "
                                      f"{settings.max_prompt_chars}", field="prompts")
        if request.max_new_tokens > settings.max_new_tokens_cap:
            raise SubmissionError(f"max_new_tokens={request.max_new_tokens}; at most {settings.max_new_tokens_cap}",
                                  field="max_new_tokens")
        card = load_card(session, model, settings.worker_alive_seconds)
        facts = card.card or {}
        tokenizer = card_tokenizer(card)
        extra = 0  # tokens the chat format adds to each prompt's own, when the card says (the worker checks all)
        if request.chat:
            if not facts.get("chat_template"):
                raise SubmissionError(f"model {model!r} has no chat template: send chat=false to generate from the "
                                      "raw prompt", field="chat")
            if request.system is not None:
                preset = (card_presets(card) or {}).get(default_preset(card), {})
                if preset.get("takes_system") is False:
                    raise SubmissionError(f"the chat template of model {model!r} takes no system prompt",
                                          field="system")
                extra += len(tokenizer.encode(request.system, add_special_tokens=False).ids)
            turn = facts.get("chat_turn_tokens")
            extra += turn if isinstance(turn, int) and not isinstance(turn, bool) else 0
        prompts: list[tuple[str, list[str]]] = []
        for i, (text, enc) in enumerate(zip(request.prompts, tokenizer.encode_batch(list(request.prompts)),
                                            strict=True)):
            ids = enc.ids
            if not ids:
                raise SubmissionError(f"prompt {i} has no tokens", field="prompts")
            if len(ids) + extra + request.max_new_tokens > card.max_context:
                raise SubmissionError(
                    f"prompt {i} has {len(ids) + extra} tokens{' in the chat format' if request.chat else ''}; with "
                    f"max_new_tokens ({request.max_new_tokens}) that exceeds the context of {model!r} "
                    f"({card.max_context} tokens)", field="prompts")
            prompts.append((text, tokenizer.decode_batch([[t] for t in ids], skip_special_tokens=False)))
        spec = generation_spec(request)
        # The kind is part of the batch key: a generate chunk is never batched with other kinds' chunks.
        return PreparedJob(model=model, spec=spec, batch_key=spec_batch_key({"kind": self.name, **spec}),
                           prompts=prompts, items=[[i] for i in range(len(prompts))], kind=self.name)

    def row_from(self, result: Any) -> GenerationRow:
        _, prompt_index = result.key
        if result.finish not in FINISHES:
            raise ValueError(f"a generation ends with one of {FINISHES}, not {result.finish!r}")
        return GenerationRow(prompt_index=int(prompt_index), text=result.text,
                             token_ids=[int(t) for t in result.token_ids], finish=result.finish)

    def describe(self, item: Sequence[int]) -> str:
        return f"prompt {item[0]}"

    def read_page(self, session: Session, job_id: str, *, limit: int | None, cursor: str | None) -> ResultPage:
        from selfie_jobs.queries import QueryError, decode_cursor, encode_cursor, fetch_page

        query = select(Generation).where(Generation.job_id == job_id)
        if cursor:
            (after,) = decode_cursor(cursor, "generate", 1)
            if not isinstance(after, int) or isinstance(after, bool):
                raise QueryError("malformed cursor")
            query = query.where(Generation.prompt_index > after)
        query = query.order_by(Generation.prompt_index)
        rows, next_cursor = fetch_page(session, query, limit, lambda last: encode_cursor("generate",
                                                                                         [last.prompt_index]))
        return ResultPage([{c: getattr(r, c) for c in self.csv_columns} for r in rows], next_cursor)

    def export_rows(self, session: Session, job_id: str, *, limit: int | None) -> Iterator[Sequence[Any]]:
        from selfie_jobs.queries import export_columns, stream_rows

        query = (select(*export_columns(Generation, self.csv_columns)).where(Generation.job_id == job_id)
                 .order_by(Generation.prompt_index))
        return stream_rows(session, query, limit)
