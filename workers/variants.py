"""Model variants on the worker: an edit's module saved to the artifact store, and variants loaded back, checked
against their SHA-256, and kept in memory (a few, least recently used first out) to be swapped in for the batches
that name them (`selfie_core.weights.swapped_in`; batches never mix variants, their batch keys differ).

A plan whose spec names a variant runs only with that variant's weights (`plan_edit`): a variant whose row is gone
(deleted), whose file is missing or whose SHA-256 differs raises `VariantUnavailable`, and the worker fails the
plan's jobs with that reason; it never serves the model's own weights instead. A cached variant is served from
memory only while its row names the same file and that file is still in the store, unchanged: re-hashing a large
file for every batch would cost more than the batch, so the file's stat (size, mtime_ns, inode) seen when it was
loaded stands for its content, and a file whose stat differs is read and checked against its SHA-256 again (a
changed file fails the jobs that name it, as an uncached one does). A file rewritten in place that keeps its size,
inode and mtime is not noticed: the store is the service's own directory, and whoever can write it so can write
the rows too.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from selfie_core.weights import MLPEdit
from selfie_jobs.variants import VariantRef, VariantUnavailable, resolve, verified_file, write_artifact

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


def _stat(path: Path) -> tuple[int, int, int] | None:
    """What stands for the file's content between checks of its SHA-256: (size, mtime_ns, inode); None when gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class VariantCache:
    """The last few variants served, by id; a variant whose file fails its check is never cached, and a cached one
    whose file's stat changed is checked again before it is served (see the module's docstring)."""

    def __init__(self, model, root: Path, size: int = CACHED_VARIANTS):
        self.model, self.root, self.size = model, root, size
        # variant id -> (what its row said when it was loaded: path, sha256, layer; the file's stat then; the edit)
        self._edits: OrderedDict[str, tuple[tuple[str, str, int], tuple[int, int, int] | None, MLPEdit]] = \
            OrderedDict()
        self._lock = threading.Lock()

    def get(self, variant_id: str, relative: str, sha256: str, layer: int) -> MLPEdit:
        path = resolve(self.root, relative)
        with self._lock:
            found = self._edits.get(variant_id)
            if found is not None and found[0] == (relative, sha256, layer):
                seen = _stat(path)
                if seen is None:
                    # the file went since it was loaded: the variant is gone, not served from memory either
                    del self._edits[variant_id]
                    raise VariantUnavailable(f"the variant's weights file is missing from the artifact store "
                                             f"({relative})")
                if seen == found[1]:
                    self._edits.move_to_end(variant_id)
                    return found[2]
                del self._edits[variant_id]  # changed since it was loaded: loaded and checked again below
        seen = _stat(path)  # before the read: a change during the load shows at the next get
        edit = load_edit(self.model, self.root, relative, sha256, layer)
        with self._lock:
            self._edits[variant_id] = ((relative, sha256, layer), seen, edit)
            self._edits.move_to_end(variant_id)
            while len(self._edits) > self.size:
                self._edits.popitem(last=False)
        return edit

    def cached(self) -> list[str]:
        with self._lock:
            return list(self._edits)

    def forget(self, variant_id: str) -> None:
        with self._lock:
            self._edits.pop(variant_id, None)


def plan_edit(cache: VariantCache, model_name: str, spec: dict, refs: dict[str, VariantRef]) -> MLPEdit | None:
    """The edit a plan runs with: None for the model's own weights (a spec without a variant), else its variant's
    (`refs`: the variants' rows as the claim read them). `VariantUnavailable` says why it cannot be served."""
    variant_id = spec.get("variant")
    if variant_id is None:
        return None
    ref = refs.get(variant_id)
    if ref is None:
        cache.forget(variant_id)
        raise VariantUnavailable(f"variant {variant_id} no longer exists (it was deleted)")
    if ref.model != model_name:
        raise VariantUnavailable(f"variant {variant_id} edits model {ref.model!r}, this worker serves {model_name!r}")
    return cache.get(ref.id, ref.path, ref.sha256, ref.layer)
