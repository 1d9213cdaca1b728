"""Injection: a forward pre-hook on decoder block k that writes vectors at the placeholder positions.

The hook fires once (the prefill pass); later calls (decode steps over the KV cache) pass through untouched.
``inject`` is a context manager that removes the hook in ``finally``, so an exception never leaves it behind.
``replaced_forward`` gives modules a forward of the engine's own for one batch and puts back what was there.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


def apply_injection(hidden: torch.Tensor, positions: Sequence[int], vectors: torch.Tensor, mode: str, strength: float,
                    plain_rows: Sequence[int] = ()) -> torch.Tensor:
    """Return a copy of ``hidden`` (batch, seq, hidden) with ``vectors`` (batch, hidden) written at ``positions``;
    the ``plain_rows`` keep their own states (nothing injected: the interpretation prompt's own run)."""
    if vectors.shape[0] != hidden.shape[0]:
        raise RuntimeError(f"injection: {vectors.shape[0]} vectors for a batch of {hidden.shape[0]}")
    if max(positions) >= hidden.shape[1]:
        raise RuntimeError(f"injection: position {max(positions)} outside a sequence of {hidden.shape[1]}")
    out = hidden.clone()
    idx = torch.as_tensor(list(positions), device=hidden.device)
    v = vectors.to(device=hidden.device, dtype=hidden.dtype)[:, None, :].expand(-1, len(positions), -1)
    if mode == "replace":
        out[:, idx] = v
    elif mode == "blend":
        out[:, idx] = strength * v + (1.0 - strength) * hidden[:, idx]
    elif mode == "add":
        out[:, idx] = hidden[:, idx] + strength * v
    else:
        raise ValueError(f"unknown injection mode {mode!r}")
    if plain_rows:
        rows = torch.as_tensor(list(plain_rows), device=hidden.device)
        out[rows] = hidden[rows]
    return out


class _InjectionHook:
    def __init__(self, positions, vectors, mode, strength, plain_rows=()):
        self.positions = list(positions)
        self.plain_rows = list(plain_rows)
        self.vectors = vectors
        self.mode = mode
        self.strength = float(strength)
        self.calls = 0

    def __call__(self, module, args, kwargs):
        self.calls += 1
        if self.calls > 1:
            return None
        if args:
            return (apply_injection(args[0], self.positions, self.vectors, self.mode, self.strength, self.plain_rows),
                    *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = apply_injection(kwargs["hidden_states"], self.positions, self.vectors, self.mode,
                                                  self.strength, self.plain_rows)
        return args, kwargs


@contextmanager
def inject(block: nn.Module, positions: Sequence[int], vectors: torch.Tensor, mode: str = "replace",
           strength: float = 1.0, plain_rows: Sequence[int] = ()) -> Iterator[_InjectionHook]:
    """Inject ``vectors`` at the input of ``block`` in its first forward while the context is open (not in the
    ``plain_rows``)."""
    hook = _InjectionHook(positions, vectors, mode, strength, plain_rows)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield hook
    finally:
        handle.remove()


_NONE = object()


@contextmanager
def replaced_forward(modules: Sequence[nn.Module], make_forward: Callable[[nn.Module], Callable]) -> Iterator[None]:
    """Give each module the instance attribute ``forward = make_forward(module)`` while the context is open.

    Afterwards each module gets back exactly what its instance held before: nothing (its class's forward) or a
    forward of its own, such as the wrapper accelerate installs on modules of a model dispatched with
    ``device_map`` (it moves inputs to the module's device and loads offloaded weights).
    """
    saved = [module.__dict__.get("forward", _NONE) for module in modules]
    try:
        for module in modules:
            module.forward = make_forward(module)
        yield
    finally:
        for module, before in zip(modules, saved):
            if before is _NONE:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before
