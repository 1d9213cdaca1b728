"""Plain data objects that cross the engine boundary: configurations, requests and results."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import SelfieInputError

InjectionMode = Literal["replace", "blend", "add"]
INJECTION_MODES = ("replace", "blend", "add")


def _from_dict(cls, data):
    """``cls(**data)``, refusing what is not a dict of its fields with an error that names them."""
    if not isinstance(data, dict):
        raise SelfieInputError(f"{cls.__name__} is built from a dict, not {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise SelfieInputError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}; "
                               f"its fields: {', '.join(known)}")
    return cls(**data)


@dataclass(frozen=True)
class InjectionConfig:
    """Where and how the extracted vector is written into the interpretation prompt.

    ``k`` is the decoder block whose *input* is modified (``0 <= k < num_hidden_layers``); the default 1 and the
    alternative 2 are the values the original SelfIE notebooks use. ``mode`` is ``replace`` (``h <- v``),
    ``blend`` (``h <- a*v + (1-a)*h``) or ``add`` (``h <- h + a*v``) with ``a = strength``.
    """

    k: int = 1
    mode: InjectionMode = "replace"
    strength: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "InjectionConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Greedy unless ``do_sample``; sampling is reproducible for a given ``seed``.

    ``eos_token_ids`` overrides the model's end-of-sequence ids (``None`` uses the tokenizer/model ones).
    """

    max_new_tokens: int = 30
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["eos_token_ids"] is not None:
            d["eos_token_ids"] = list(d["eos_token_ids"])
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationConfig":
        if isinstance(data, dict) and isinstance(data.get("eos_token_ids"), list):
            data = {**data, "eos_token_ids": tuple(data["eos_token_ids"])}
        return _from_dict(cls, data)


@dataclass(frozen=True)
class InterpretRequest:
    """Interpret the hidden state of ``prompt`` at ``layer`` (``hidden_states[layer]``) and token index ``token``.

    ``key`` is opaque: it is copied to the result so that the caller can map results back to its own rows.
    """

    prompt: str
    layer: int
    token: int
    key: Any = None


@dataclass(frozen=True, eq=False)
class VectorRequest:
    """Interpret an arbitrary vector of the model's hidden size (a tensor, numpy array or list of floats)."""

    vector: Any
    key: Any = None
    label: str | None = None


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


@dataclass
class Interpretation:
    """One result: what the model says about one hidden state.

    ``token_ids`` are the generated ids (an end-of-sequence id, when one was generated, is the last one);
    ``relevancy[i] = |P_inject(token_ids[i]) - P_no_inject(token_ids[i])|`` and ``mean_relevancy`` its mean.
    For vector requests ``layer`` and ``token`` are ``None`` and ``prompt`` is the label (or "").
    ``grounded``: whether the text is grounded in the injected state; when not, ``ungrounded_reason`` says why
    (``selfie_core.grounding.REASONS``).
    """

    key: Any
    prompt: str
    layer: int | None
    token: int | None
    source_token: str | None
    text: str
    token_ids: list[int] = field(default_factory=list)
    relevancy: list[float] = field(default_factory=list)
    mean_relevancy: float = 0.0
    grounded: bool = True
    ungrounded_reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "key": _jsonable(self.key),
            "prompt": self.prompt,
            "layer": self.layer,
            "token": self.token,
            "source_token": self.source_token,
            "text": self.text,
            "token_ids": [int(t) for t in self.token_ids],
            "relevancy": [float(r) for r in self.relevancy],
            "mean_relevancy": float(self.mean_relevancy),
            "grounded": bool(self.grounded),
            "ungrounded_reason": self.ungrounded_reason,
        }
