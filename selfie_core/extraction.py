"""Extraction: one forward pass with all hidden states per source prompt, batched across prompts.

Layer ``L`` is ``hidden_states[L]`` as Hugging Face returns it (0 = embedding output, ``L`` = input of decoder
block ``L``; ``num_layers`` is what current transformers returns last, the output of the final norm for
LLaMA and GPT-2 layouts); token ``t`` indexes ``tokenizer(prompt).input_ids``. Prompts are right-padded: with a causal mask and
default position ids, a real token never sees the padding to its right, so its hidden states are those of the
prompt run alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .modelcall import forward


@torch.inference_mode()
def extract(
    model,
    prompt_ids: Sequence[Sequence[int]],
    wanted: Sequence[Sequence[tuple[int, int]]],
    pad_id: int,
    device: torch.device,
    max_batch_tokens: int = 16384,
) -> list[dict[tuple[int, int], torch.Tensor]]:
    """For prompt ``i`` return ``{(layer, token): vector}`` for every pair in ``wanted[i]``.

    Prompts are sorted by length and packed into batches of at most ``max_batch_tokens`` padded tokens.
    """
    out: list[dict[tuple[int, int], torch.Tensor]] = [dict() for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    start = 0
    while start < len(order):
        longest = len(prompt_ids[order[start]])
        end = start + 1
        while end < len(order):
            longest = max(longest, len(prompt_ids[order[end]]))
            if longest * (end - start + 1) > max_batch_tokens:
                break
            end += 1
        group = order[start:end]
        width = max(len(prompt_ids[i]) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(prompt_ids[i])] = torch.tensor(prompt_ids[i])
            mask[row, : len(prompt_ids[i])] = 1
        _, _, hidden = forward(model, ids.to(device), attention_mask=mask.to(device), logits_to_keep=1,
                               use_cache=False, output_hidden_states=True)
        for row, i in enumerate(group):
            for layer, token in wanted[i]:
                out[i][(layer, token)] = hidden[layer][row, token].detach().clone()
        del hidden
        start = end
    return out
