"""Where a causal LM keeps its decoder blocks, embeddings and final norm, per supported model family.

Only module *locations* are described here; every forward pass is Hugging Face's own. A family is listed only once
a tiny random model of it matches ``reference.reference_interpret`` (tests/unit/core/test_families.py): the engine
takes shortcuts (the blocks below k are skipped and their cache copied from the prompt run, prefix-tree packed
relevancy with 4D masks, preallocated caches) whose assumptions are checked per family there, not inferred from
the module names. Family facts the shortcuts depend on:

- LLaMA layout (``model.layers``): each block returns a plain tensor (so a skipped block can pass its input on),
  and position ids and rotary tables come from the model's forward, not from the blocks' inputs.
- Gemma 2/3 scale the embeddings inside the embedding module (``hidden_states[0]`` is already scaled) and norm with
  ``(1 + weight)`` (their own class, which the Triton RMSNorm leaves alone); their sliding-window layers keep a
  cache of their own kind and grow, and ``validation.check_generation`` refuses an interpretation longer than the
  window, within which sliding and full attention agree. Gemma 2 soft-caps attention scores (eager attention only)
  and both soft-cap the final logits inside the model's forward.
- Qwen3 norms queries and keys per head; Phi-3 fuses q, k and v in one projection: both inside the attention
  module, which the engine never replaces.
- GPT-2 and GPT-NeoX blocks are run, never skipped (``ModelAdapter.skippable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError

# layout name -> (blocks path, embeddings path, final norm path); paths are attribute chains from the CausalLM.
LAYOUTS: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "model.embed_tokens", "model.norm"),
    "gpt2": ("transformer.h", "transformer.wte", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
}

#: config.model_type -> (what users call it, layout). SmolLM2 is a LLaMA.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LLaMA 2/3 (and SmolLM2)", "llama"),
    "mistral": ("Mistral", "llama"),
    "qwen2": ("Qwen2/2.5", "llama"),
    "qwen3": ("Qwen3", "llama"),
    "gemma2": ("Gemma 2", "llama"),
    "gemma3_text": ("Gemma 3 (text models, Gemma3ForCausalLM)", "llama"),
    "phi3": ("Phi-3", "llama"),
    "gpt2": ("GPT-2", "gpt2"),
    "gpt_neox": ("GPT-NeoX (and Pythia)", "gpt_neox"),
}

#: Layouts whose blocks return a plain tensor and may be skipped below the injection layer.
SKIPPABLE_LAYOUTS = frozenset({"llama"})


def supported_families() -> str:
    """The supported families, for error messages."""
    return ", ".join(f"{name} [{model_type}]" for model_type, (name, _) in FAMILIES.items())

# layout name -> (MLP, the norm whose output is the MLP's input), attribute names on one decoder block.
BLOCK_PARTS: dict[str, tuple[str, str]] = {
    "llama": ("mlp", "post_attention_layernorm"),
    "gpt2": ("mlp", "ln_2"),
    "gpt_neox": ("mlp", "post_attention_layernorm"),
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
    family: str
    blocks: nn.ModuleList
    embeddings: nn.Module
    final_norm: nn.Module | None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def skippable(self) -> bool:
        """Whether the blocks below the injection layer may be skipped (``generation._shared_lower_blocks``)."""
        return self.layout in SKIPPABLE_LAYOUTS

    def block_device(self, k: int) -> torch.device:
        """Where block ``k`` computes (``module_device``)."""
        return module_device(self.blocks[k])

    def embedding_device(self) -> torch.device:
        return module_device(self.embeddings)

    def devices(self) -> list[torch.device]:
        """The distinct devices the blocks compute on, in block order."""
        return list(dict.fromkeys(module_device(block) for block in self.blocks))

    def mlp_name(self) -> str:
        """The attribute under which every decoder block holds its MLP."""
        return BLOCK_PARTS[self.layout][0]

    def mlp(self, block: int) -> nn.Module:
        return getattr(self.blocks[block], self.mlp_name())

    def mlp_norm(self, block: int) -> nn.Module:
        """The norm whose input is the block's residual stream after attention and whose output feeds the MLP.

        GPT-NeoX with ``use_parallel_residual`` feeds its MLP from the block's input, not from the stream after
        attention: there the MLP's input is not a norm of the residual it is added to, and edits refuse it."""
        block_module = self.blocks[block]
        config = getattr(block_module, "config", None)
        parallel = getattr(block_module, "use_parallel_residual", getattr(config, "use_parallel_residual", False))
        if self.layout == "gpt_neox" and parallel:
            raise UnsupportedArchitectureError(
                "GPT-NeoX with use_parallel_residual adds its MLP's output to the block input, not to the stream "
                "after attention: the MLP states of an edit (residual, pre_mlp, post) do not exist there")
        if hasattr(block_module, "post_feedforward_layernorm"):  # Gemma 2/3: post = residual + norm(MLP(...))
            raise UnsupportedArchitectureError(
                f"{type(block_module).__name__} normalises its MLP's output before adding it to the residual: "
                "post == MLP(pre_mlp) + residual does not hold there, and edits refuse it")
        return getattr(block_module, BLOCK_PARTS[self.layout][1])


def _hook_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # accelerate chains hooks in a SequentialHook
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes. A module that accelerate offloads (to the CPU or disk) keeps its weights on the
    meta device between forwards and runs on its hook's execution device."""
    for sub in module.modules():
        device = _hook_device(sub)
        if device is not None:
            return device
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def check_supported(config, class_name: str | None = None) -> tuple[str, str]:
    """(family, layout) of a model config; ``UnsupportedArchitectureError`` naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        archs = getattr(config, "architectures", None) or [class_name or type(config).__name__]
        what = f"{archs[0]} (model_type {model_type!r})"
        hint = ""
        if model_type == "gemma3":
            hint = " Gemma 3 image-text checkpoints are not; their text model in a gemma3_text checkpoint is."
        raise UnsupportedArchitectureError(
            f"{what} is not supported. Supported families: {supported_families()}.{hint}")
    return FAMILIES[model_type]



def get_adapter(model: nn.Module) -> ModelAdapter:
    """Find the decoder blocks of ``model``; raise ``UnsupportedArchitectureError`` naming what is supported."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not a Hugging Face causal LM (no config). Supported families: "
            f"{supported_families()}.")
    family, layout = check_supported(config, type(model).__name__)
    blocks_path, emb_path, norm_path = LAYOUTS[layout]
    blocks = _get(model, blocks_path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: a {family} model should keep its decoder blocks (an nn.ModuleList) at "
            f"'{blocks_path}'; this one does not (load it with AutoModelForCausalLM)")
    emb = _get(model, emb_path)
    if emb is None or not hasattr(emb, "weight"):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: found decoder blocks at '{blocks_path}' but no token embeddings at '{emb_path}'"
        )
    return ModelAdapter(layout=layout, family=family, blocks=blocks, embeddings=emb, final_norm=_get(model, norm_path))
