"""Input checks with messages a user can act on. Every failure raises ``SelfieInputError``."""

from __future__ import annotations

import math

import torch

from .errors import SelfieInputError
from .records import INJECTION_MODES, GenerationConfig, InjectionConfig, InterpretRequest, VectorRequest
from .templates import PreparedPrompt

MAX_NEW_TOKENS_CAP = 1024


def check_injection(injection: InjectionConfig, num_layers: int) -> None:
    if not _is_int(injection.k) or not 0 <= injection.k < num_layers:
        raise SelfieInputError(f"injection layer k={injection.k!r} is outside the model: use 0 <= k < {num_layers}")
    if injection.mode not in INJECTION_MODES:
        raise SelfieInputError(f"injection mode {injection.mode!r} is unknown: use one of {', '.join(INJECTION_MODES)}")
    try:
        strength = float(injection.strength)
    except (TypeError, ValueError):
        raise SelfieInputError(f"injection strength {injection.strength!r} is not a number") from None
    if not math.isfinite(strength):
        raise SelfieInputError(f"injection strength must be finite, got {injection.strength!r}")


def check_generation(gen: GenerationConfig, prompt: PreparedPrompt, max_context: int | None,
                     window: int | None = None) -> None:
    """``window``: the model's sliding attention window. The engine's cache and masks assume that every position
    sees the whole interpretation prompt and what was generated before it, so a window that hides some is
    refused (extraction prompts may be longer: their forward pass keeps the model's own masks)."""
    n = gen.max_new_tokens
    if not _is_int(n) or not 1 <= n <= MAX_NEW_TOKENS_CAP:
        raise SelfieInputError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS_CAP}, got {n!r}")
    if not isinstance(gen.do_sample, bool):
        raise SelfieInputError(f"do_sample must be True or False, got {gen.do_sample!r}")
    if gen.do_sample:  # greedy decoding ignores temperature and top_p
        if not (_is_number(gen.temperature) and math.isfinite(gen.temperature) and gen.temperature > 0):
            raise SelfieInputError(f"temperature must be a finite number > 0 when sampling, got {gen.temperature!r}")
        if not (_is_number(gen.top_p) and 0 < gen.top_p <= 1):
            raise SelfieInputError(f"top_p must be in (0, 1], got {gen.top_p!r}")
    if gen.seed is not None and (not _is_int(gen.seed) or not -(1 << 63) <= gen.seed < (1 << 63)):
        raise SelfieInputError(f"seed must be None or an integer that fits in 64 bits, got {gen.seed!r}")
    eos = gen.eos_token_ids
    if eos is not None and (isinstance(eos, (str, bytes)) or not hasattr(eos, "__iter__")
                            or not all(_is_int(i) and i >= 0 for i in eos)):
        raise SelfieInputError(f"eos_token_ids must be None or a list of token ids (integers >= 0), got {eos!r}")
    if window is not None and len(prompt.input_ids) + n > window:
        raise SelfieInputError(
            f"the interpretation prompt ({len(prompt.input_ids)} tokens) plus max_new_tokens={n} exceeds this "
            f"model's sliding attention window of {window} tokens: use a shorter template or fewer new tokens"
        )
    if max_context is not None and len(prompt.input_ids) + n > max_context:
        raise SelfieInputError(
            f"the interpretation prompt ({len(prompt.input_ids)} tokens) plus max_new_tokens={n} exceeds the "
            f"model's context of {max_context} tokens"
        )


def check_batch_size(batch_size) -> None:
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise SelfieInputError(f"batch_size must be None (automatic) or an integer >= 1, got {batch_size!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_interpret_request(req, ids: list[int] | None, num_layers: int, max_context: int | None, where: str) -> None:
    if not isinstance(req, InterpretRequest):
        raise SelfieInputError(f"{where}: expected an InterpretRequest, got {type(req).__name__}")
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise SelfieInputError(f"{where}: the prompt is empty")
    assert ids is not None
    if max_context is not None and len(ids) > max_context:
        raise SelfieInputError(f"{where}: the prompt has {len(ids)} tokens, longer than the model's context of {max_context}")
    if not _is_int(req.layer) or not 0 <= req.layer <= num_layers:
        raise SelfieInputError(f"{where}: layer {req.layer!r} is out of range: use 0..{num_layers} (0 = embeddings)")
    if not _is_int(req.token) or not 0 <= req.token < len(ids):
        raise SelfieInputError(
            f"{where}: token {req.token!r} is out of range: the prompt has {len(ids)} tokens (valid 0..{len(ids) - 1})"
        )


def vector_tensor(req, hidden_size: int, where: str) -> torch.Tensor:
    """The request's vector as a float32 CPU tensor of shape (hidden_size,), or SelfieInputError."""
    if not isinstance(req, VectorRequest):
        raise SelfieInputError(f"{where}: expected a VectorRequest, got {type(req).__name__}")
    try:
        vec = torch.as_tensor(req.vector.detach().cpu() if isinstance(req.vector, torch.Tensor) else req.vector)
        vec = vec.to(torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SelfieInputError(f"{where}: the vector is not numeric ({exc})") from None
    vec = vec.squeeze()
    if vec.dim() != 1 or vec.shape[0] != hidden_size:
        raise SelfieInputError(f"{where}: the vector has shape {tuple(vec.shape)}, expected ({hidden_size},)")
    if not bool(torch.isfinite(vec).all()):
        raise SelfieInputError(f"{where}: the vector contains NaN or infinite values")
    return vec
