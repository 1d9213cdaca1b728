"""Plain text generation (no injection) for the checks around edits: greedy or sampled, batched, left-padded.

``edit`` swaps an edited MLP in for the call (``selfie_core.weights``); the model's own weights are back after.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .templates import InterpretationTemplate
from .weights import MLPEdit, swapped_in


def chat_text(tokenizer, user: str, assistant_prefix: str = "") -> str:
    """``user`` as one user turn in the tokenizer's chat format (the original ``[INST]`` form without one),
    followed by the start of the assistant's answer. A chat as the model is used: with the chat template's own
    default system prompt, when it has one (interpretation presets leave it out; this is the chatted prompt)."""
    if getattr(tokenizer, "chat_template", None):
        return "".join(InterpretationTemplate.chat(tokenizer, (user,), assistant_prefix,
                                                   tokenizer_default_system=True).parts)
    return f"[INST] {user} [/INST] {assistant_prefix}".rstrip(" ") if assistant_prefix else f"[INST] {user} [/INST]"


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *, edit: MLPEdit | None = None,
             batch_size: int = 64, do_sample: bool = False, seed: int | None = None) -> list[str]:
    """The decoded continuation (special tokens skipped) of each prompt, in order.

    Prompts are left-padded (the padding's attention is masked), as the original's benchmarks batch them."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = []
    with swapped_in(model, edit):
        for start in range(0, len(prompts), batch_size):
            rows = [list(tokenizer(p).input_ids) for p in prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            if do_sample and seed is not None:
                torch.manual_seed(seed + start)
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=do_sample,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad,
                                       **({} if do_sample else {"temperature": None, "top_p": None, "top_k": None}))
            out.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    return out
