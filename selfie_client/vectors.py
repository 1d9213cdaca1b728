"""Vectors for the `vectors` job kind: whatever the caller holds (numpy array, torch tensor, nested lists) as the
`.npy` bytes the upload route reads, and expressions over hidden states as the JSON the API takes.

torch is never imported here: a tensor is recognised by its `detach` method and converted through its own `numpy`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def as_array(vectors: Any):
    """A 2-D floating numpy array (n, hidden) from a numpy array, a torch tensor or (nested) lists of numbers."""
    import numpy as np

    if hasattr(vectors, "detach") and hasattr(vectors, "cpu"):  # a torch tensor, without importing torch
        tensor = vectors.detach().cpu()
        if str(getattr(tensor, "dtype", "")) == "torch.bfloat16":
            tensor = tensor.float()  # numpy has no bfloat16
        vectors = tensor.numpy()
    array = np.asarray(vectors)
    if array.dtype.kind in "iu":
        array = array.astype(np.float64)
    if array.dtype.kind != "f":
        raise TypeError(f"vectors must be numbers, got dtype {array.dtype}")
    if array.dtype.itemsize > 4 and bool(np.all(np.abs(array) <= np.finfo(np.float32).max)):
        # Workers compute in float32 or narrower: float32 halves the upload (2,000 float64 vectors of a 4096-wide
        # model are past the default 64 MiB upload limit). A value past float32's range (or not finite) is sent
        # as it is, so that the service refuses it and says why.
        array = array.astype(np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"vectors must have shape (hidden_size,) or (n, hidden_size), got {array.shape}")
    return array


def npy_bytes(array) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def state(prompt: str, layer: int, token: int, coef: float = 1.0) -> dict[str, Any]:
    """One term of an expression: coef * hidden_states[layer][token] of `prompt` (token negative from the end)."""
    return {"coef": float(coef), "prompt": prompt, "layer": int(layer), "token": int(token)}


def expression(*terms: dict[str, Any]) -> dict[str, Any]:
    """`expression(state(A, 12, -1), state(B, 12, -1, coef=-1))`: the difference of two hidden states."""
    return {"terms": list(terms)}


def labels_list(labels: Sequence[str] | None, count: int) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(f"{len(labels)} labels for {count} vectors: give one label per vector")
    return labels
