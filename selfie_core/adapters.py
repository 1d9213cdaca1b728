"""Where a causal LM keeps its decoder blocks, embeddings and final norm, per module layout.

Only module *locations* are described here; every forward pass is Hugging Face's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError

# layout name -> (blocks path, embeddings path, final norm path); paths are attribute chains from the CausalLM.
LAYOUTS: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "model.embed_tokens", "model.norm"),  # Llama-2/3, Mistral, Qwen2, SmolLM2, Gemma...
    "gpt2": ("transformer.h", "transformer.wte", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
}


def _get(obj, path: str):
    for name in path.split("."):
        if not hasattr(obj, name):
            return None
        obj = getattr(obj, name)
    return obj


@dataclass(frozen=True)
class ModelAdapter:
    layout: str
    blocks: nn.ModuleList
    embeddings: nn.Module
    final_norm: nn.Module | None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def block_device(self, k: int) -> torch.device:
        for p in self.blocks[k].parameters():
            return p.device
        return torch.device("cpu")

    def embedding_device(self) -> torch.device:
        return self.embeddings.weight.device


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Find the decoder blocks of ``model``; raise ``UnsupportedArchitectureError`` naming what is missing."""
    tried = []
    for layout, (blocks_path, emb_path, norm_path) in LAYOUTS.items():
        blocks = _get(model, blocks_path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            tried.append(blocks_path)
            continue
        emb = _get(model, emb_path)
        if emb is None or not hasattr(emb, "weight"):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: found decoder blocks at '{blocks_path}' but no token embeddings at '{emb_path}'"
            )
        return ModelAdapter(layout=layout, blocks=blocks, embeddings=emb, final_norm=_get(model, norm_path))
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} is not supported: no decoder blocks (an nn.ModuleList) at any of "
        f"{', '.join(repr(t) for t in tried)}. Supported layouts: LLaMA family (model.layers), GPT-2 (transformer.h), "
        "GPT-NeoX (gpt_neox.layers)."
    )
