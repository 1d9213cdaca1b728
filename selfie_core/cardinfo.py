"""The model card: JSON-serialisable facts about a served model.

``tokenizer_json`` lets a process without torch or transformers tokenize exactly as the engine does:
``tokenizers.Tokenizer.from_str(card["tokenizer_json"]).encode(prompt).ids == tokenizer(prompt).input_ids``.
"""

from __future__ import annotations

import logging

from .modelcall import sliding_window

log = logging.getLogger(__name__)


def _int_or_list(value):
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return int(value) if value is not None else None


def model_card(engine) -> dict:
    model, tok = engine.model, engine.tokenizer
    cfg = model.config
    backend = getattr(tok, "backend_tokenizer", None)
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    return {
        "name": engine.name,
        "architecture": archs[0],
        "model_type": getattr(cfg, "model_type", None),
        "layout": engine.adapter.layout,
        "family": engine.adapter.family,
        "num_layers": engine.num_layers,
        "hidden_size": engine.hidden_size,
        "max_context": engine.max_context,
        "sliding_window": sliding_window(model),
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else getattr(cfg, "vocab_size", None),
        "eos_token_id": _int_or_list(tok.eos_token_id),
        "bos_token_id": _int_or_list(tok.bos_token_id),
        "pad_token_id": _int_or_list(tok.pad_token_id),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "chat_template": getattr(tok, "chat_template", None) if isinstance(getattr(tok, "chat_template", None), str) else None,
        "chat_turn_tokens": chat_turn_tokens(tok),
        "tokenizer_json": backend.to_str() if backend is not None else None,
        "layer_range": [0, engine.num_layers],
        "injection_layer_range": [0, engine.num_layers - 1],
    }


def chat_turn_tokens(tokenizer) -> int | None:
    """Tokens the chat template adds around one user turn (with the generation prompt, no system turn): what a
    process without the template adds to a prompt's own tokens to check a chat generation's length. None without a
    chat template, or when the template cannot render a turn without a system prompt of its own."""
    from .errors import SelfieInputError
    from .textgen import prompt_ids

    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    try:
        return max(0, len(prompt_ids(tokenizer, "x", chat=True)) - len(tokenizer("x").input_ids))
    except SelfieInputError as exc:
        log.warning("no chat turn length for this tokenizer: %s", exc)
        return None


def preset_facts(tokenizer, model_name: str = "") -> dict:
    """Preset name -> its parts, length in tokens and whether it takes a system prompt (``takes_system``), for
    every preset this tokenizer can render."""
    from .errors import SelfieInputError
    from .templates import PRESETS, InterpretationTemplate

    presets: dict[str, dict] = {}
    for name in PRESETS:
        try:
            template = InterpretationTemplate.preset(name, tokenizer)
            presets[name] = {"parts": list(template.parts), "num_tokens": len(template.prepare(tokenizer).input_ids)}
        except Exception as exc:  # noqa: BLE001 - a preset this tokenizer cannot render is just not offered
            log.warning("preset %s is not available for %s: %s", name, model_name, exc)
            continue
        try:
            InterpretationTemplate.preset(name, tokenizer, system="system")
            presets[name]["takes_system"] = True
        except SelfieInputError:
            presets[name]["takes_system"] = False
    return presets


def folder_card(source: str, name: str, dtype: str = "float32") -> dict:
    """The card of the model at ``source`` (a Hugging Face folder or hub id) without loading its weights: the
    model is built on the meta device from its config, so the card's facts (layers, hidden size, context, family,
    tokenizer, chat template, presets) come from the same code as a loaded model's. Raises
    ``UnsupportedArchitectureError`` for a family the engine does not support."""
    from accelerate import init_empty_weights
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .adapters import check_supported
    from .engine import SelfieEngine
    from .loading import _dtype, hub_errors

    torch_dtype = _dtype(dtype)
    with hub_errors(source):
        try:
            config = AutoConfig.from_pretrained(source)
        except StrictDataclassError as exc:  # a field of the wrong type, or fields that do not fit together
            raise ValueError(f"its config.json is not valid: {exc.__cause__ or exc}") from exc
        check_supported(config)
        tokenizer = AutoTokenizer.from_pretrained(source)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    card = SelfieEngine(model, tokenizer, name=name, cuda_graphs=False).model_card()
    if card["max_context"] is None:  # the API checks every prompt and template against it
        raise ValueError("its config.json gives no context length (max_position_embeddings, a positive integer)")
    presets = preset_facts(tokenizer, name)
    card.update(name=name, presets=presets, default_preset="summarize" if "summarize" in presets else None,
                source=source)
    return card
