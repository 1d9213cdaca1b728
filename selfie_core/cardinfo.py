"""The model card: JSON-serialisable facts about a served model.

``tokenizer_json`` lets a process without torch or transformers tokenize exactly as the engine does:
``tokenizers.Tokenizer.from_str(card["tokenizer_json"]).encode(prompt).ids == tokenizer(prompt).input_ids``.
"""

from __future__ import annotations

from .modelcall import sliding_window


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
        "tokenizer_json": backend.to_str() if backend is not None else None,
        "layer_range": [0, engine.num_layers],
        "injection_layer_range": [0, engine.num_layers - 1],
    }
