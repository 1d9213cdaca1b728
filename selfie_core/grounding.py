"""Is an interpretation grounded in the injected state, or would the prompt say it anyway?

Four signs that it is not, checked in this order (the first that holds is the reason):

- ``baseline``: its text equals the *baseline*, the interpretation prompt's own output with nothing injected
  (same template, generation settings and weights; ``SelfieEngine.baseline``).
- ``repetition``: degenerate repetition. Relevancy rewards repeating the injected token ("E E E E",
  "Tower Tower Tower" are among the highest-scoring outputs), so these are told apart by their shape: one period
  of at most ``MAX_PERIOD`` tokens, repeated back to back at least ``MIN_REPEATS`` times, covers at least
  ``MIN_COVERAGE`` of the output's tokens (the end-of-sequence id not counted). Chosen on SmolLM2 outputs
  (``benchmarks/grounding_data.py``; docs/grounding.md), where loops such as "The message is:\n\n" (6 tokens)
  repeated to the end are as common as one repeated word.
- ``empty``: no letter or digit at all ("", "\n": an end of sequence at once). Relevancy is high for these too,
  since the end-of-sequence id is what the injection made likely; there is nothing to read.
- ``low_relevancy``: mean relevancy under ``GroundingConfig.min_mean_relevancy`` (a job setting; its default is
  chosen from the same data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SelfieInputError

#: the reasons an interpretation is not grounded, in the order they are checked
REASONS = ("baseline", "repetition", "empty", "low_relevancy")

MAX_PERIOD = 8
MIN_REPEATS = 3
MIN_COVERAGE = 0.5
#: default of ``GroundingConfig.min_mean_relevancy`` (docs/grounding.md says how it was chosen)
DEFAULT_MIN_MEAN_RELEVANCY = 0.05


@dataclass(frozen=True)
class GroundingConfig:
    """``min_mean_relevancy``: an interpretation whose mean relevancy is below it is not grounded (0 turns the
    check off)."""

    min_mean_relevancy: float = DEFAULT_MIN_MEAN_RELEVANCY

    def __post_init__(self) -> None:
        value = self.min_mean_relevancy
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise SelfieInputError(f"min_mean_relevancy must be a number in 0..1, not {value!r}")

    @classmethod
    def from_dict(cls, data: dict | None) -> "GroundingConfig":
        if data is None:
            return cls()
        if not isinstance(data, dict) or set(data) - {"min_mean_relevancy"}:
            raise SelfieInputError(f"a grounding config is {{'min_mean_relevancy': number}}, not {data!r}")
        return cls(**data)


@dataclass(frozen=True)
class Baseline:
    """The interpretation prompt's own output, nothing injected: its text and generated ids (an end-of-sequence
    id, when one was generated, is the last)."""

    text: str
    token_ids: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": [int(t) for t in self.token_ids]}


def longest_repeat(tokens: Sequence[int]) -> tuple[int, int]:
    """(period, tokens covered) of the longest back-to-back repetition of one period of at most ``MAX_PERIOD``
    tokens, repeated at least ``MIN_REPEATS`` times; (0, 0) when there is none."""
    best = (0, 0)
    for period in range(1, MAX_PERIOD + 1):
        run = 0  # how many tokens in a row equal the token one period before them
        for i in range(period, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - period] else 0
            repeats = (run + period) // period
            if repeats >= MIN_REPEATS and repeats * period > best[1]:
                best = (period, repeats * period)
    return best


def is_repetition(token_ids: Sequence[int], eos_ids: Sequence[int] = ()) -> bool:
    tokens = list(token_ids)
    if tokens and tokens[-1] in set(eos_ids):
        tokens = tokens[:-1]
    if not tokens:
        return False
    _, covered = longest_repeat(tokens)
    return covered >= MIN_REPEATS and covered >= MIN_COVERAGE * len(tokens)


def judge(text: str, token_ids: Sequence[int], mean_relevancy: float, baseline: Baseline | None,
          config: GroundingConfig, eos_ids: Sequence[int] = ()) -> str | None:
    """Why the interpretation is not grounded (one of ``REASONS``), or None when it is."""
    if baseline is not None and text.strip() == baseline.text.strip():
        return "baseline"
    if is_repetition(token_ids, eos_ids):
        return "repetition"
    if not any(ch.isalnum() for ch in text):
        return "empty"
    if mean_relevancy < config.min_mean_relevancy:
        return "low_relevancy"
    return None
