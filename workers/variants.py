"""Model variants on the worker: an edit's module saved to the artifact store, and variants loaded back, checked
against their SHA-256, and kept in memory (a few, least recently used first out) to be swapped in for the batches
that name them (`selfie_core.weights.swapped_in`; batches never mix variants, their batch keys differ).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from selfie_core.weights import MLPEdit
from selfie_jobs.variants import VariantUnavailable, verified_file, write_artifact

#: Variants kept in memory per worker (each is one MLP: ~2.4 MB for SmolLM2-135M, ~350 MB for an 8B model's).
CACHED_VARIANTS = 4


def save_edit(root: Path, job_id: str, edit: MLPEdit) -> tuple[str, str]:
    """Write the edit's module weights (contiguous CPU tensors, the model's dtype) and return (path, sha256)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in edit.state_dict().items()}
    return write_artifact(root, job_id, save_safetensors(tensors, metadata={"block": str(edit.block)}))


def load_edit(model, root: Path, relative: str, sha256: str, layer: int) -> MLPEdit:
    """The variant as an `MLPEdit` of block ``layer - 1``: a copy of the model's MLP with the stored weights."""
    path = verified_file(root, relative, sha256)
    tensors = load_safetensors(path.read_bytes())
    edit = MLPEdit(model, layer - 1)
    own = edit.module.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise VariantUnavailable(f"the variant's weights do not fit block {layer - 1} of this model "
                                 f"(tensors {sorted(tensors)})")
    with torch.no_grad():
        edit.module.load_state_dict({k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in tensors.items()})
    edit.module.requires_grad_(False)
    return edit


class VariantCache:
    """The last few variants served, by id; a variant whose file fails its check is never cached."""

    def __init__(self, model, root: Path, size: int = CACHED_VARIANTS):
        self.model, self.root, self.size = model, root, size
        self._edits: OrderedDict[str, MLPEdit] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, variant_id: str, relative: str, sha256: str, layer: int) -> MLPEdit:
        with self._lock:
            edit = self._edits.get(variant_id)
            if edit is not None:
                self._edits.move_to_end(variant_id)
                return edit
        edit = load_edit(self.model, self.root, relative, sha256, layer)
        with self._lock:
            self._edits[variant_id] = edit
            while len(self._edits) > self.size:
                self._edits.popitem(last=False)
        return edit

    def forget(self, variant_id: str) -> None:
        with self._lock:
            self._edits.pop(variant_id, None)
