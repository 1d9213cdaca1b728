"""Job requests as typed schemas: what a client may ask for, checked for shape before the model card is consulted.

Everything here is independent of any model: the checks that need the model (depth, tokens, presets, context)
live in `selfie_jobs.submission`, which reads the model card from the database.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator

from selfie_jobs.selectors import parse_selector

# Hard ceilings that hold whatever the settings say; the configurable caps are applied at submission.
MAX_PROMPTS_HARD = 100_000
MAX_INDEX = 1_000_000
MAX_SEED = 2**32 - 1
#: The longest time to live a job or a key may ask for (ten years, in seconds): past it, keep the job for ever by
#: asking for no time to live.
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refuse it here rather than fail in the database.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


SafeStr = Annotated[str, AfterValidator(_no_nul)]


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _not_blank(value: list[str]) -> list[str]:
    for i, prompt in enumerate(value):
        if not prompt.strip():
            raise ValueError(f"prompt {i} is empty")
    return value


#: A job's prompts: one string or a list of them, none blank (interpret, lenses and generate jobs alike).
Prompts = Annotated[list[SafeStr], BeforeValidator(_one_or_many), Field(min_length=1, max_length=MAX_PROMPTS_HARD),
                    AfterValidator(_not_blank)]


def refuse_fields(data: Any, refused: tuple[str, ...], message: str) -> Any:
    """The body of a `mode="before"` model validator of a request that inherits engine options it does not use:
    given, they would be accepted and ignored, so they are refused (`message` names them through `{fields}`)."""
    if isinstance(data, dict):
        given = [name for name in refused if name in data]
        if given:
            raise ValueError(message.format(fields=", ".join(given)))
    return data


def schema_without(refused: tuple[str, ...], examples: list[dict[str, Any]]):
    """`json_schema_extra` of such a request: its OpenAPI schema without the inherited fields it refuses, with its
    own `examples`."""

    def schema_extra(schema: dict[str, Any]) -> None:
        for name in refused:
            schema.get("properties", {}).pop(name, None)
        if "required" in schema:
            schema["required"] = [r for r in schema["required"] if r not in refused]
        schema["examples"] = examples

    return schema_extra
# Numbers in request bodies are strict: `true` is not 1 and `"3"` is not 3 (JSON has booleans and numbers apart, and
# so does this API); a float field takes an integer, nothing else. Every numeric body field uses these.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Index = Annotated[Int, Field(ge=-MAX_INDEX, le=MAX_INDEX)]


class IndexRange(BaseModel):
    """Python-slice semantics: `start` inclusive, `stop` exclusive (None: to the end), negatives count from the end."""

    model_config = ConfigDict(extra="forbid")

    start: Index = 0
    stop: Index | None = None
    step: Annotated[Int, Field(ge=1, le=MAX_INDEX)] = 1


Selector = Literal["all"] | Annotated[list[Index], Field(min_length=1, max_length=100_000)] | IndexRange


class Targets(BaseModel):
    """What to interpret in every prompt: explicit [layer, token] pairs, or layers x tokens.

    Layers are `hidden_states` indices (0 = embeddings .. num_layers); token indices index the prompt's tokens,
    negative ones counted from the end (-1 = the last token). `layers` and `tokens` also take the text forms of the
    CLI and the client: "0:31:5", "-3:" (a range) or "0,4,-1" (a list), with the same meaning (selfie_jobs.selectors).
    """

    model_config = ConfigDict(extra="forbid")

    pairs: Annotated[list[tuple[Index, Index]], Field(min_length=1, max_length=100_000)] | None = None
    layers: Selector = "all"
    tokens: Selector = "all"

    @field_validator("layers", "tokens", mode="before")
    @classmethod
    def _text_form(cls, value: Any) -> Any:
        # "0:30:5", "-3:", "0,4,8": the text the CLI and the client take, with the same meaning (selfie_jobs.selectors)
        if isinstance(value, str) and value != "all":
            return parse_selector(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _pairs_exclude_grid(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("pairs") is not None and ("layers" in data or "tokens" in data):
            raise ValueError("give either 'pairs' or 'layers'/'tokens', not both")
        return data


def _placeholder(value: Any) -> Any:
    # Literal[0] alone also takes false and 0.0
    if type(value) is not int:
        raise ValueError("a placeholder is the integer 0")
    return value


TemplatePart = SafeStr | Annotated[Literal[0], BeforeValidator(_placeholder)]


#: longest system prompt of a preset (characters; as selfie_core.templates.MAX_SYSTEM_CHARS)
MAX_SYSTEM_CHARS = 4000


class Template(BaseModel):
    """A preset name known to the model card, or text parts with the placeholder 0 where the vector goes.

    A preset renders with no system turn (a chat template's own default system prompt is left out) unless
    `system` gives one."""

    model_config = ConfigDict(extra="forbid")

    preset: Annotated[SafeStr, Field(min_length=1, max_length=100)] | None = None
    parts: Annotated[list[TemplatePart], Field(min_length=1, max_length=200)] | None = None
    system: Annotated[SafeStr, Field(min_length=1, max_length=MAX_SYSTEM_CHARS)] | None = Field(
        None, description="A system prompt for a preset (none by default).")

    @model_validator(mode="after")
    def _one_of(self) -> Template:
        if self.preset is not None and self.parts is not None:
            raise ValueError("give exactly one of 'preset' or 'parts'")
        if self.preset is None and self.parts is None and self.system is None:
            raise ValueError("give exactly one of 'preset' or 'parts' (or 'system' alone, for the default preset)")
        if self.system is not None and self.parts is not None:
            raise ValueError("'system' goes with a preset; with 'parts', write the system turn into the parts")
        if self.system is not None and not self.system.strip():
            raise ValueError("'system' is blank; leave it out for no system prompt")
        if self.system is not None and any("\ue000" <= c <= "\ue002" for c in self.system):
            raise ValueError("'system' must not contain the private-use characters U+E000..U+E002")
        if self.parts is not None:
            if not any(p == 0 and not isinstance(p, str) for p in self.parts):
                raise ValueError("template parts need at least one placeholder (the integer 0)")
            if sum(len(p) for p in self.parts if isinstance(p, str)) > 10_000:
                raise ValueError("template text is too long (10000 characters at most)")
        return self


class Decoding(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    do_sample: Bool = False
    temperature: Float = Field(1.0, gt=0.0, le=10.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    seed: Annotated[Int, Field(ge=0, le=MAX_SEED)] | None = None


#: as selfie_core.grounding.DEFAULT_MIN_MEAN_RELEVANCY (a test holds them equal; this package has no torch)
DEFAULT_MIN_MEAN_RELEVANCY = 0.05


class Grounding(BaseModel):
    """When an interpretation counts as grounded in the injected state (selfie_core.grounding; docs/grounding.md)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_mean_relevancy: Float = Field(DEFAULT_MIN_MEAN_RELEVANCY, ge=0.0, le=1.0, description=(
        "An interpretation with a mean relevancy below this is not grounded (0: no such check)."))


class EngineOptions(BaseModel):
    """How the engine interprets: template, injection and generation. One schema for a job's request and for an
    audit's options, so both accept the same values with the same defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    template: Template | None = Field(None, description="Default: the model's default preset.")
    k: Annotated[Int, Field(ge=0, le=MAX_INDEX)] = Field(1, description="Injection layer (input of block k).")
    injection_mode: Literal["replace", "blend", "add"] = "replace"
    injection_strength: Float = Field(1.0, ge=0.0, le=100.0)
    max_new_tokens: Annotated[Int, Field(ge=1, le=100_000)] = 30
    decoding: Decoding = Field(default_factory=Decoding)
    grounding: Grounding = Field(default_factory=Grounding)

    @field_validator("template", mode="before")
    @classmethod
    def _preset_shorthand(cls, value: Any) -> Any:
        return {"preset": value} if isinstance(value, str) else value


class EngineJobFields(EngineOptions):
    """What every kind of job request holds besides its inputs: the engine options, the model, and the job's
    priority and idempotency key (`engine_spec` turns the options into the stored spec)."""

    model: Annotated[SafeStr, Field(min_length=1, max_length=200)] | None = Field(
        None, description="Served model name; default: the service's default model."
    )
    priority: Annotated[Int, Field(ge=0, le=9)] = Field(5, description="0 (lowest) .. 9 (most urgent).")
    idempotency_key: Annotated[SafeStr, Field(min_length=1, max_length=200)] | None = Field(
        None, description="A retried submit with the same key returns the first job instead of making another."
    )
    ttl_seconds: Annotated[Int, Field(ge=1, le=MAX_TTL_SECONDS)] | None = Field(
        None, description="Seconds the job and its results are kept after it finished (at least a day after it "
                          "was submitted); default: the key's, else the service's (none: kept for ever)."
    )
    variant: Annotated[SafeStr, Field(min_length=1, max_length=64)] | None = Field(
        None, description="A model variant's id (GET /v1/variants): the job runs on the model with the variant's "
                          "edited module swapped in. It must be the caller's and of the job's model."
    )


class JobCreate(EngineJobFields):
    """A request to interpret hidden states of one model over one or many prompts."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m-instruct",
                    "prompts": ["The Eiffel Tower is located in Paris."],
                    "targets": {"layers": {"start": 0, "stop": None, "step": 4}, "tokens": [-3, -2, -1]},
                    "template": {"preset": "summarize"},
                    "k": 1,
                    "max_new_tokens": 20,
                }
            ]
        },
    )

    prompts: Prompts = Field(description="One prompt or a list of prompts.")
    targets: Literal["all"] | Targets = Field("all", description="'all' = every layer x every token.")


def engine_spec(request: EngineJobFields, template: dict[str, Any]) -> dict[str, Any]:
    """The stored `jobs.spec`: what the engine needs besides the (prompt, layer, token) items."""
    return with_variant(request, {
        "template": template,
        "injection": {"k": request.k, "mode": request.injection_mode, "strength": float(request.injection_strength)},
        "generation": {
            "max_new_tokens": request.max_new_tokens,
            "do_sample": request.decoding.do_sample,
            "temperature": float(request.decoding.temperature),
            "top_p": float(request.decoding.top_p),
            "seed": request.decoding.seed,
        },
        "grounding": {"min_mean_relevancy": float(request.grounding.min_mean_relevancy)},
    })


def with_variant(request: EngineJobFields, spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` with the request's variant, if it names one: the variant is part of the spec, so of the batch key
    (`spec_batch_key`), and batches never mix variants. A spec without a variant has no such key at all, so the specs
    and batch keys of jobs on the model's own weights are those stored before variants existed."""
    return {**spec, "variant": request.variant} if request.variant is not None else spec


def spec_batch_key(spec: dict[str, Any]) -> str:
    """Hash of the normalized spec JSON: equal keys (same model) can share one engine batch."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_hash(request: EngineJobFields, model: str, kind: str | None = None) -> str:
    """Hash of the request as validated (shorthands expanded, defaults filled, `model` resolved), without its
    idempotency key: two bodies that ask for the same job hash alike however they were spelled. `kind`: the job
    kind, hashed in for every kind but `interpret` (whose hashes were stored before kinds existed)."""
    # A request without a time to live (or without a variant) hashes as before the field existed, so idempotency
    # keys stored then still match their retries.
    exclude = ({"idempotency_key"} | ({"ttl_seconds"} if request.ttl_seconds is None else set())
               | ({"variant"} if request.variant is None else set()))
    normalized = request.model_dump(mode="json", exclude=exclude)
    normalized["model"] = model
    if kind is not None:
        normalized["kind"] = kind
    canonical = json.dumps(normalized, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_selector(selector: Literal["all"] | list[int] | IndexRange, length: int, what: str) -> list[int]:
    """Indices in `range(length)` picked by `selector`; raises ValueError naming `what` on an out-of-range index."""
    if selector == "all":
        return list(range(length))
    if isinstance(selector, IndexRange):
        for name, bound in (("start", selector.start), ("stop", selector.stop)):
            if bound is not None and not -length <= bound <= length:
                raise ValueError(f"{what} range {name}={bound} is outside -{length}..{length}")
        return list(range(length))[selector.start : selector.stop : selector.step]
    out = []
    for index in selector:
        out.append(resolve_index(index, length, what))
    return out


def resolve_index(index: int, length: int, what: str) -> int:
    if not -length <= index < length:
        raise ValueError(f"{what} {index} is out of range: valid are 0..{length - 1} (or -{length}..-1 from the end)")
    return index + length if index < 0 else index
