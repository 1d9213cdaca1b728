"""The straightforward, unoptimised SelfIE path the engine is checked and benchmarked against.

Per prompt one extraction forward; per batch of 64 rows: a forward pre-hook on block k plus ``model.generate``
over the full interpretation prompt, then two teacher-forced passes over prompt + generated tokens (with and
without injection) for relevancy. No shared prefix, no cache reuse. The equivalence tests and
``benchmarks/engine_bench.py`` both use this one implementation.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig as HFGenerationConfig

from .adapters import get_adapter
from .engine import _eos_ids, as_template
from .hooks import inject
from .modelcall import wide
from .records import GenerationConfig, InjectionConfig, Interpretation, InterpretRequest


@torch.inference_mode()
def reference_interpret(model, tokenizer, requests: Sequence[InterpretRequest], template=None,
                        injection: InjectionConfig | None = None, generation: GenerationConfig | None = None,
                        batch_size: int = 64) -> list[Interpretation]:
    injection = injection or InjectionConfig()
    generation = generation or GenerationConfig()
    if generation.do_sample:
        raise ValueError("the reference path is greedy only")
    adapter = get_adapter(model)
    block = adapter.blocks[injection.k]
    device = adapter.embedding_device()
    prepared = as_template(template, tokenizer).prepare(tokenizer)
    eos = _eos_ids(model, tokenizer, generation)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)

    # extraction: one forward per prompt
    hidden: dict[str, tuple] = {}
    ids_of: dict[str, list[int]] = {}
    for req in requests:
        if req.prompt not in hidden:
            ids = list(tokenizer(req.prompt).input_ids)
            ids_of[req.prompt] = ids
            out = model(torch.tensor([ids], device=device), output_hidden_states=True)
            hidden[req.prompt] = tuple(h[0] for h in out.hidden_states)

    prompt = torch.tensor([prepared.input_ids], device=device)
    plen = prompt.shape[1]
    hf_config = HFGenerationConfig(max_new_tokens=generation.max_new_tokens, do_sample=False, eos_token_id=eos,
                                   pad_token_id=pad, num_beams=1)
    results: list[Interpretation] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        vectors = torch.stack([hidden[r.prompt][r.layer][r.token] for r in chunk])
        inputs = prompt.expand(len(chunk), -1)
        mask = torch.ones_like(inputs)
        with inject(block, prepared.insert_positions, vectors, injection.mode, injection.strength):
            seqs = model.generate(inputs, attention_mask=mask, generation_config=hf_config)
        gen = seqs[:, plen:].tolist()
        lengths = []
        for row in gen:
            n = len(row)
            for i, tok in enumerate(row):
                if tok in eos:
                    n = i + 1
                    break
            lengths.append(n)
        with inject(block, prepared.insert_positions, vectors, injection.mode, injection.strength):
            logits_inj = model(seqs).logits
        logits_no = model(seqs).logits
        targets = seqs[:, plen:]
        p_inj = torch.softmax(wide(logits_inj[:, plen - 1 : -1]), -1).gather(-1, targets[..., None])[..., 0]
        p_no = torch.softmax(wide(logits_no[:, plen - 1 : -1]), -1).gather(-1, targets[..., None])[..., 0]
        for row, req in enumerate(chunk):
            n = lengths[row]
            token_ids = gen[row][:n]
            rel = (p_inj[row, :n] - p_no[row, :n]).abs().tolist()
            text_ids = token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids
            results.append(Interpretation(
                key=req.key, prompt=req.prompt, layer=req.layer, token=req.token,
                source_token=tokenizer.decode([ids_of[req.prompt][req.token]]),
                text=tokenizer.decode(text_ids, skip_special_tokens=True), token_ids=token_ids, relevancy=rel,
                mean_relevancy=sum(rel) / len(rel) if rel else 0.0,
            ))
    return results
