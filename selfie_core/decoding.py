"""Decode steps: one new token per row over the KV cache that the prefill left.

Two ways to run a step, both through the model's own forward:

- ``GrowingDecoder``: the cache grows by one position per step and attention reads the filled part. Used when the
  cache cannot be made static (a model spread over devices, a sliding-window or other special cache layer, an
  attention implementation that takes no 4D mask).
- ``StaticDecoder``: every step has the same shapes. The cache layers are ``PreallocatedLayer`` buffers in static
  mode, written at a position held in a device tensor; the position ids and a 4D mask (columns up to that
  position) are derived from the same tensor inside the step, which then advances it. Nothing in a step depends on
  the host, so on CUDA the step can be captured once as a CUDA graph and replayed: a 7B-shaped model launches
  hundreds of kernels per step, and replaying them costs the host one call instead of a full Python forward.

All rows of a batch share one interpretation prompt, so cache index and position id are the same in every row.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend

from . import triton_attention
from .modelcall import (CUSTOM_MASK_ATTENTION, PreallocatedLayer, attention_implementation, attention_kernels,
                        custom_mask, forward, select_rows)

#: How a static step attends: "sdpa" (the model's own attention, SDPA kernels in ``cuda_attention``'s order) or
#: "triton" (``triton_attention``'s single-query kernel, for models on transformers' SDPA implementation).
STEP_ATTENTION = ("sdpa", "triton")


def check_step_attention(name: str) -> None:
    if name not in STEP_ATTENTION:
        raise ValueError(f"decode attention must be one of {STEP_ATTENTION}, not {name!r}")
    if name == "triton" and not triton_attention.available():
        raise RuntimeError("decode attention 'triton' needs the triton package (CUDA builds of torch bring it)")


class GrowingDecoder:
    """Eager steps over a cache that grows by one position per step."""

    #: SDPA kernels of a step's attention on CUDA (None: the engine's, ``modelcall.WITHOUT_CUDNN``). A step
    #: attends with no mask, and every step has a new shape, so kernels that plan per shape (cuDNN) are left out.
    cuda_attention: tuple | None = None

    def __init__(self, model, cache):
        self.model = model
        self.cache = cache

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (batch,) -> next-token logits (batch, vocab)."""
        with attention_kernels(tokens.device, self.cuda_attention):
            logits, self.cache, _ = forward(self.model, tokens[:, None], cache=self.cache, logits_to_keep=1)
        return logits[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (batch indices) in the cache."""
        select_rows(self.cache, rows)

    def prune_now(self, finished: int, batch: int) -> bool:
        """Drop finished rows as soon as any finish: every later step is cheaper."""
        return finished > 0

    def close(self) -> None:
        """Nothing to free beyond the cache, which the caller drops."""


def static_decoding_supported(model, cache) -> bool:
    """Every cache layer preallocated and on one device, and an attention implementation that takes a 4D mask."""
    if attention_implementation(model) not in CUSTOM_MASK_ATTENTION or not cache.layers:
        return False
    if not all(isinstance(layer, PreallocatedLayer) and layer.is_initialized for layer in cache.layers):
        return False
    return len({layer.device for layer in cache.layers}) == 1


class StaticDecoder:
    """Fixed-shape steps over a static preallocated cache; on CUDA with ``graphs`` the step is a CUDA graph.

    ``length``: positions the cache holds after the prefill (the interpretation prompt's length). ``attention``:
    one of ``STEP_ATTENTION``.
    """

    #: SDPA kernels of a step's masked attention on CUDA, in order of preference. Flash takes no mask; for the
    #: 7B-shaped step on an H200 (640 rows, one query, 40 positions) cuDNN took 330 us per layer, the
    #: memory-efficient kernel 634 us, math 1223 us (benchmarks/attention_bench.py). The shapes stay fixed, so
    #: cuDNN plans once per batch size; it takes no float32, which goes to the next kernel.
    cuda_attention: tuple | None = (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)

    def __init__(self, model, cache, length: int, graphs: bool = False, attention: str = "sdpa"):
        check_step_attention(attention)
        self.model = model
        self.attention = attention
        self.cache = cache
        first = cache.layers[0]
        self.device = first.device
        self.capacity = first.capacity
        self.write_at = torch.tensor([length], device=self.device)
        self._next = length  # the host's copy of write_at, for the capacity check
        self.columns = torch.arange(self.capacity, device=self.device)
        for layer in cache.layers:
            layer.make_static(self.write_at)
        self.dtype = first.keys.dtype
        self.graphs = graphs and self.device.type == "cuda"
        self._tokens: torch.Tensor | None = None  # the step's input buffer (graph input)
        self._logits: torch.Tensor | None = None  # the graph's output buffer
        self._graph = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (batch,) -> next-token logits (batch, vocab). With a graph, the logits live in the graph's
        output buffer and are valid until the next step."""
        if self._next >= self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({self._next + 1} positions)")
        self._next += 1
        if self._tokens is None or self._tokens.shape[0] != tokens.shape[0]:
            self._tokens = torch.empty((tokens.shape[0], 1), dtype=torch.long, device=self.device)
        self._tokens[:, 0].copy_(tokens)
        if self._graph is not None:
            self._graph.replay()
            return self._logits
        if self.graphs:
            return self._capture()
        return self._forward()

    def _forward(self) -> torch.Tensor:
        kernel = triton_attention.selected(self.model) if self.attention == "triton" else nullcontext()
        with attention_kernels(self.device, self.cuda_attention), kernel:
            return self._masked_step()

    def _masked_step(self) -> torch.Tensor:
        batch = self._tokens.shape[0]
        position_ids = self.write_at.view(1, 1).expand(batch, 1)
        visible = (self.columns <= self.write_at).view(1, 1, 1, -1).expand(batch, 1, 1, -1)
        mask = custom_mask(self.model, visible, self.dtype)
        logits, _, _ = forward(self.model, self._tokens, cache=self.cache, attention_mask=mask,
                               position_ids=position_ids, logits_to_keep=1)
        self.write_at.add_(1)
        return logits[:, -1]

    def _capture(self) -> torch.Tensor:
        """Run this step for real on a side stream (CUDA's rule for the warm-up before a capture), then record the
        same step as a graph. Recording runs no kernel, so the cache and ``write_at`` move only once."""
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            logits = self._forward()
        current.wait_stream(stream)
        logits.record_stream(current)  # read on this stream below: its memory is not reused before that
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (a worker's heartbeat asks the device for its free memory)
        # may go on calling CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._logits = self._forward()
        self._graph = graph
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows``: the buffers move, so a graph is dropped and captured again at the new size."""
        select_rows(self.cache, rows)
        self._graph = None
        self._logits = None
        self._tokens = None

    def prune_now(self, finished: int, batch: int) -> bool:
        """Eager steps drop finished rows at once. A graph keeps computing them (their tokens after EOS are
        discarded) until half the batch has finished, so that it is captured again only a few times."""
        return finished > 0 if not self.graphs else 2 * finished >= batch

    def close(self) -> None:
        """Free the graph and its memory pool."""
        self._graph = None
        self._logits = None
