"""Thin helpers around a Hugging Face causal LM forward and its ``DynamicCache``.

They only adapt argument names across model classes (``cache`` vs ``past_key_values``, ``logits_to_keep``)
and copy cache tensors; the forward itself is always the model's own.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import lru_cache

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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
    # current outputs name the cache ``cache`` (``past_key_values`` is a deprecated alias that warns when read);
    # older ones and other layouts have only ``past_key_values``
    new_cache = out.cache if hasattr(out, "cache") else getattr(out, "past_key_values", None)
    logits = out.logits
    if logits_to_keep is not None and logits.shape[1] > logits_to_keep:
        logits = logits[:, -logits_to_keep:]
    return logits, new_cache, getattr(out, "hidden_states", None)


#: The engine's scaled-dot-product attention kernels on CUDA: off cuDNN. cuDNN builds an execution plan for every
#: new shape, and generation changes shapes at every step (the cache grows, rows leave at EOS, batches differ): on
#: an H200 with the 7B-shaped benchmark the first batch took 2.6 s with cuDNN and 1.7 s without, and later batches
#: 1.6 s against 1.5 s.
WITHOUT_CUDNN = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def attention_kernels(device: torch.device, backends: tuple | None = WITHOUT_CUDNN):
    """On CUDA, limit scaled-dot-product attention to ``backends``, tried in that order (None: no limit here,
    whatever an enclosing call set holds). Elsewhere nothing changes."""
    if device.type != "cuda" or not backends:
        return nullcontext()
    return sdpa_kernel(list(backends), set_priority=True)


#: Attention implementations that take a custom 4D mask (flash attention, for one, does not).
CUSTOM_MASK_ATTENTION = ("sdpa", "eager")


def attention_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def sliding_window(model) -> int | None:
    """How many positions back the model attends, where it limits that (None: the whole sequence). Qwen2 carries a
    window that ``use_sliding_window`` turns off."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return window


def custom_mask(model, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D bool mask (True: may attend) in the form the model's attention takes: eager attention adds its mask
    to the scores, so it gets 0 and the most negative ``dtype`` value instead."""
    if attention_implementation(model) != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (float64 stays float64) for softmax."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (batch, heads, seq, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers sized once for the whole generation.

    ``DynamicLayer`` grows by ``torch.cat``: every decode step copies the whole cache and allocates a new, larger
    tensor (on a GPU with hundreds of rows, that copy and the allocator's churn cost more than the attention).
    Here each step writes its positions in place and ``keys``/``values`` are views of the filled part, so the
    attention reads exactly the same numbers.

    After ``make_static(write_at)`` every update writes one position at the index held in the device tensor
    ``write_at`` (which the caller advances) and returns the whole buffers: every decode step then has the same
    shapes and the same tensor addresses, which a CUDA graph needs. The caller's attention mask hides the
    positions not written yet; the buffers start zeroed, so those positions hold no NaN that a masked score
    times a value could spread.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._filled = 0
        self._write_at: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._write_at is not None:
            self._key_buffer.index_copy_(2, self._write_at, key_states)
            self._value_buffer.index_copy_(2, self._write_at, value_states)
            return self._key_buffer, self._value_buffer
        if self._key_buffer is None:
            batch, heads, _, dim = key_states.shape
            self._key_buffer = key_states.new_zeros((batch, heads, self.capacity, dim))
            self._value_buffer = value_states.new_zeros((batch, heads, self.capacity, value_states.shape[-1]))
            self.device = key_states.device
            self.is_initialized = True
        end = self._filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
        self._key_buffer[:, :, self._filled : end].copy_(key_states)
        self._value_buffer[:, :, self._filled : end].copy_(value_states)
        self._filled = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (on this layer's device), buffers included."""
        if self.is_initialized:
            self._key_buffer = self._key_buffer.index_select(0, indices)
            self._value_buffer = self._value_buffer.index_select(0, indices)
            end = self.capacity if self._write_at is not None else self._filled
            self.keys = self._key_buffer[:, :, :end]
            self.values = self._value_buffer[:, :, :end]

    def make_static(self, write_at: torch.Tensor) -> None:
        """Switch to fixed-shape updates of one position at ``write_at`` (a (1,) long tensor on this layer's
        device); ``keys``/``values`` become the whole buffers."""
        if not self.is_initialized:
            raise RuntimeError("a preallocated cache layer turns static only once it holds the prompt")
        self._write_at = write_at
        self.keys, self.values = self._key_buffer, self._value_buffer

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a preallocated generation cache is not cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a preallocated generation cache is not repeated")


def make_cache(model, tensors: list[tuple[torch.Tensor, torch.Tensor]], batch: int, upto: int | None = None,
               capacity: int | None = None) -> DynamicCache:
    """A new cache for ``batch`` rows holding the first ``upto`` positions of a batch-1 cache's tensors.

    ``capacity`` (positions): preallocate every full-attention layer for that many positions (for generation);
    without it layers grow by concatenation (for a single forward).
    """
    cache = DynamicCache(config=model.config)
    if capacity is not None:
        cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for i, (k, v) in enumerate(tensors):
        if upto is not None:
            k, v = k[:, :, :upto], v[:, :, :upto]
        k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        if not isinstance(cache.layers[i], PreallocatedLayer):  # it copies into its buffer; cat needs real rows
            k, v = k.contiguous(), v.contiguous()
        cache.update(k, v, i)
    return cache


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only ``rows`` (a LongTensor of batch indices) in every layer of ``cache``."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None:  # each layer on its own device (device_map may spread them)
            layer.batch_select_indices(rows.to(keys.device))
