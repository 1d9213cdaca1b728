"""Relevancy: ``|P_inject(token) - P_no_inject(token)|`` for every generated token.

``P_no_inject`` is the teacher-forced probability of each generated token after the same interpretation prompt
with its placeholders left as they are. The prompt part is shared by all rows, so its cache (``PromptState``) is
computed once; one batched pass over the generated tokens gives the rest.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .generation import PromptState
from .modelcall import forward, make_cache, wide


@torch.inference_mode()
def no_inject_probs(model, state: PromptState, sequences: Sequence[Sequence[int]], device: torch.device,
                    max_logit_elements: int = 1 << 27) -> list[list[float]]:
    """P_no_inject of every token of every sequence (each a list of generated ids)."""
    result: list[list[float]] = [[float(state.last_probs[s[0]])] if s else [] for s in sequences]
    todo = [i for i, s in enumerate(sequences) if len(s) > 1]
    if not todo:
        return result
    vocab = state.last_probs.shape[0]
    width = max(len(sequences[i]) for i in todo) - 1
    rows_per_pass = max(1, max_logit_elements // (width * vocab))
    for start in range(0, len(todo), rows_per_pass):
        chunk = todo[start : start + rows_per_pass]
        # Right padding: a causal model never lets a real position see the padding after it.
        inputs = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = torch.tensor(sequences[i])
            inputs[row, : len(seq) - 1] = seq[:-1]
            targets[row, : len(seq) - 1] = seq[1:]
        cache = make_cache(model, state.kv, len(chunk))
        logits, _, _ = forward(model, inputs.to(device), cache=cache, use_cache=True)
        logits = wide(logits)
        targets = targets.to(logits.device)
        probs = (logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, -1)).exp().cpu()
        del logits, cache
        for row, i in enumerate(chunk):
            result[i].extend(probs[row, : len(sequences[i]) - 1].tolist())
    return result


def relevancy_scores(p_inject: Sequence[float], p_no_inject: Sequence[float]) -> list[float]:
    return [abs(a - b) for a, b in zip(p_inject, p_no_inject)]
