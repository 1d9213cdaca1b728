"""Thin helpers around a Hugging Face causal LM forward and its ``DynamicCache``.

They only adapt argument names across model classes (``cache`` vs ``past_key_values``, ``logits_to_keep``)
and copy cache tensors; the forward itself is always the model's own.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache


@lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward(model, input_ids: torch.Tensor, cache=None, attention_mask=None, logits_to_keep: int | None = None,
            use_cache: bool = True, output_hidden_states: bool = False, position_ids: torch.Tensor | None = None):
    """Run ``model`` once; returns (logits, cache, hidden_states)."""
    params = _forward_params(type(model))
    kwargs: dict = {"input_ids": input_ids, "use_cache": use_cache}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if output_hidden_states:
        kwargs["output_hidden_states"] = True
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if logits_to_keep is not None and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    logits = out.logits
    if logits_to_keep is not None and logits.shape[1] > logits_to_keep:
        logits = logits[:, -logits_to_keep:]
    return logits, new_cache, getattr(out, "hidden_states", None)


def wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (float64 stays float64) for softmax."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (batch, heads, seq, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(model, tensors: list[tuple[torch.Tensor, torch.Tensor]], batch: int, upto: int | None = None) -> DynamicCache:
    """A new cache for ``batch`` rows holding the first ``upto`` positions of a batch-1 cache's tensors."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(tensors):
        if upto is not None:
            k, v = k[:, :, :upto], v[:, :, :upto]
        cache.update(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous(), i)
    return cache


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only ``rows`` (a LongTensor of batch indices) in every layer of ``cache``."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            layer.values = layer.values.index_select(0, rows.to(layer.values.device))
