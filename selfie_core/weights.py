"""Which weights a model computes with right now: its own, or its own with edited modules swapped in.

An edit never changes the resident model's parameters. ``swapped_in`` puts an edited copy of one decoder block's
MLP in place of the block's own for the length of a ``with`` and puts the original back in ``finally``, under the
model's lock, so that another thread's batch never runs with (or without) a swap it did not ask for.

Every cache of model computations (the engine's interpretation-prompt states) is keyed by ``weights_key(model)``:
``()`` for the model's own weights, and for a swap the edit's identity plus its parameters' version counters,
which every in-place change (an optimiser step) bumps. A state computed under one set of weights is therefore
never read under another: not the base model's under an edit, not one epoch's edit under the next.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .adapters import get_adapter

_uids = itertools.count(1)
_uids_guard = threading.Lock()
# model -> the swaps in place now, innermost last: (block index, MLPEdit)
_active: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class MLPEdit:
    """A trainable copy of the MLP of decoder block ``block`` (hidden state layer ``block + 1``).

    ``module`` is the copy; it starts equal to the model's own MLP and only it is ever optimised. ``uid`` is unique
    in the process (never reused, unlike ``id()``), so that two edits of the same block never share cache keys.
    """

    def __init__(self, model: nn.Module, block: int, module: nn.Module | None = None):
        adapter = get_adapter(model)
        if not 0 <= block < adapter.num_layers:
            raise ValueError(f"block {block} is outside 0..{adapter.num_layers - 1}")
        self.block = block
        self.module = module if module is not None else copy.deepcopy(adapter.mlp(block))
        with _uids_guard:
            self.uid = next(_uids)

    @property
    def layer(self) -> int:
        """The hidden-state layer this edit changes (the output of its block)."""
        return self.block + 1

    def key(self) -> tuple:
        return (self.block, self.uid, tuple(p._version for p in self.module.parameters()))

    def state_dict(self) -> dict:
        """The edited module's weights (detached copies), e.g. to save as a variant."""
        return {name: t.detach().clone() for name, t in self.module.state_dict().items()}


def weights_key(model: nn.Module) -> tuple:
    """What the model computes with now: ``()`` for its own weights, else the key of every edit swapped in."""
    return tuple(edit.key() for edit in _active.get(model, ()))


@contextmanager
def swapped_in(model: nn.Module, edit: MLPEdit | None) -> Iterator[None]:
    """Compute with ``edit``'s MLP in place of block ``edit.block``'s own while the context is open (``None``:
    the model's own weights, a no-op). The original module object goes back in ``finally``."""
    if edit is None:
        yield
        return
    # imported here: the engine imports this module for weights_key
    from .engine import model_lock

    adapter = get_adapter(model)
    block = adapter.blocks[edit.block]
    name = adapter.mlp_name()
    with model_lock(model):
        original = getattr(block, name)
        swaps = _active.setdefault(model, [])
        setattr(block, name, edit.module)
        swaps.append(edit)
        try:
            yield
        finally:
            swaps.pop()
            setattr(block, name, original)
