"""How many rows of an engine batch fit in the memory of the devices a model spreads over.

Pure arithmetic over memory figures passed in (bytes free per device): the engine feeds it what CUDA reports, the
tests feed it numbers. A row needs, on each device, its KV cache for the blocks there (three copies at the peak:
the prompt cache expanded per row, the generation cache and the relevancy pass's), its activations, and on the
device of the output layer its logits (float32, a few vocab-sized tensors).
"""

from __future__ import annotations

from collections.abc import Mapping

#: Share of each device's free memory that engine batches may take; the rest absorbs the allocator's
#: fragmentation and the transient tensors of a forward.
BATCH_SHARE = 0.6
#: Upper bound of an automatic batch (beyond it the decode steps gain nothing measurable).
MAX_AUTO_ROWS = 2048


def row_bytes(layers_per_device: Mapping[str, int], output_device: str, *, kv_heads: int, head_dim: int,
              hidden_size: int, vocab_size: int, tokens: int, elem_bytes: int) -> dict[str, int]:
    """Bytes one row of a batch needs on each device (``tokens``: interpretation prompt plus new tokens)."""
    devices = dict.fromkeys([*layers_per_device, output_device], 0)
    out = {}
    for device in devices:
        kv = 2 * layers_per_device.get(device, 0) * kv_heads * head_dim * tokens * elem_bytes
        need = 3 * kv + 16 * hidden_size * tokens * elem_bytes  # cache copies, activations
        if device == output_device:
            need += 4 * vocab_size * 4  # float32 logits and their softmax
        out[device] = need
    return out


def rows_that_fit(free_bytes: Mapping[str, int], per_row: Mapping[str, int], *, share: float = BATCH_SHARE,
                  cap: int = MAX_AUTO_ROWS) -> int:
    """The most rows every device holds: the device that fills first decides (at least 1, at most ``cap``)."""
    missing = sorted(set(per_row) - set(free_bytes))
    if missing:
        raise ValueError(f"no free-memory figure for {', '.join(missing)}")
    fits = [int(free_bytes[d] * share) // need for d, need in per_row.items() if need > 0]
    return int(max(1, min([cap, *fits])))
