"""Batched generation from an injected interpretation prompt.

All rows of a batch share one interpretation prompt. Its positions before the first placeholder are identical in
every row (causal attention), so their KV cache comes from one batch-1 pass (``PromptState``) and is expanded;
only the rest of the prompt is prefilled per row, with the injection hook on block ``k``. Decode steps use the KV
cache and no hook. The probability of each chosen token under the injected run (``P_inject``) is read from the
same logits that chose it, which is what a teacher-forced re-run over the generated sequence would compute. Rows
that emit an end-of-sequence id leave the batch (their cache rows are dropped; with CUDA graphs, once half the
batch has finished). The decode steps themselves are in ``decoding``.
"""

from __future__ import annotations

import secrets
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch
from torch.profiler import record_function

from .hooks import inject, replaced_forward
from .decoding import GrowingDecoder, StaticDecoder, check_step_attention, static_decoding_supported
from .modelcall import cache_tensors, forward, make_cache, wide
from .templates import PreparedPrompt


DECODE_MODES = ("growing", "static", "graphs")


@dataclass
class PromptState:
    """The interpretation prompt run once without injection: its KV cache and next-token probabilities."""

    prepared: PreparedPrompt
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    last_probs: torch.Tensor  # (vocab,) float32: P_no_inject of the first generated token
    hidden: tuple[torch.Tensor, ...] | None = None  # hidden_states[L] (1, length, hidden) of the same run

    @property
    def length(self) -> int:
        return len(self.prepared.input_ids)


@torch.inference_mode()
def prepare_prompt_state(model, prepared: PreparedPrompt, device: torch.device) -> PromptState:
    ids = torch.tensor([prepared.input_ids], device=device)
    logits, cache, hidden = forward(model, ids, logits_to_keep=1, output_hidden_states=True)
    return PromptState(prepared, cache_tensors(cache), torch.softmax(wide(logits[0, -1]), -1), tuple(hidden))


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def _shared_lower_blocks(lower_blocks: Sequence[torch.nn.Module], block: torch.nn.Module, hidden_k: torch.Tensor):
    """Skip ``lower_blocks`` (the blocks below k) and feed ``hidden_k`` to ``block`` (block k) instead.

    Injection happens at block k's input, so below k every row computes exactly what the prompt's own run did:
    its hidden states and KV cache are taken from there. A skipped block's forward returns its input unchanged
    (LLaMA-layout blocks return a plain tensor); a forward pre-hook on block k then replaces that input with
    ``hidden_k``. Hooks registered later (the injection) see the replaced input.
    """
    def replace(module, args, kwargs):
        h = hidden_k.to(device=(args[0] if args else kwargs["hidden_states"]).device)
        if args:
            return (h, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h
        return args, kwargs

    handle = block.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        with replaced_forward(lower_blocks, lambda _: _passthrough):
            yield
    finally:
        handle.remove()


@dataclass
class GeneratedRow:
    token_ids: list[int]
    p_inject: list[float]
    stopped: bool = False  # left the batch at the caller's request (`watch`): its output is incomplete


#: Called before every decode step with (step, steps, rows still decoding, as indices into the batch); returns the
#: rows to stop now. A stopped row leaves the batch like a finished one and comes back marked ``stopped``.
StepWatch = Callable[[int, int, Sequence[int]], Collection[int]]


#: Below this a temperature is applied in float64, from the top logit (`_choose`): float32 logits over a tiny
#: temperature overflow, and 1e-300 itself rounds to 0 in float32.
SMALLEST_SAFE_TEMPERATURE = 1e-3


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
            generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = wide(logits)
    if temperature < SMALLEST_SAFE_TEMPERATURE:
        # the top logit stays 0 and the others go to -inf at worst: the greedy choice, never 0/0 = NaN
        shifted = logits.double() - logits.double().amax(-1, keepdim=True)
        probs = torch.softmax(shifted / temperature, -1)
    else:
        probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; each row has its own generator, so a row's
    # sample does not depend on which other rows share its batch.
    noise = torch.stack([torch.rand(probs.shape[-1], generator=g, device=g.device) for g in generators])
    noise = noise.to(probs.device).clamp_min_(1e-20)
    return (probs / -noise.log()).argmax(-1)


@torch.inference_mode()
def generate_batch(
    model,
    block: torch.nn.Module,
    state: PromptState,
    vectors: torch.Tensor,
    *,
    mode: str,
    strength: float,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    row_seeds: Sequence[int] | None = None,
    device: torch.device,
    lower_blocks: Sequence[torch.nn.Module] | None = None,
    decode: str = "growing",
    decode_attention: str = "sdpa",
    watch: StepWatch | None = None,
    plain_rows: Sequence[int] = (),
) -> list[GeneratedRow]:
    """``lower_blocks``: the blocks below k, when they may be skipped (LLaMA layout): the prefill then runs blocks
    >= k only, from the prompt run's hidden state at block k, and the KV cache below k comes from that run.

    ``decode`` (see ``decoding``): "growing" steps over a cache that grows (the fastest eager steps: on the CPU the
    static ones were 2-5% slower, attending over the whole buffer); "static" fixed-shape steps; "graphs" static
    steps replayed as CUDA graphs on CUDA (static eager steps elsewhere). A cache that cannot be static grows.
    ``decode_attention``: how static steps attend (``decoding.STEP_ATTENTION``); growing steps keep the model's.
    ``watch`` (``StepWatch``): asked between decode steps which rows to stop (a cancelled job's rows), so that a
    long generation ends within one step of being told; the other rows go on as if the stopped ones had finished.
    ``plain_rows``: rows that get nothing injected (their vectors are ignored): the prompt's own output."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, not {decode!r}")
    check_step_attention(decode_attention)
    batch = vectors.shape[0]
    prepared = state.prepared
    p0 = prepared.first_insert
    ids = torch.tensor(prepared.input_ids, device=device)
    cache = make_cache(model, state.kv, batch, upto=p0, capacity=state.length + max_new_tokens)
    suffix = ids[p0:].unsqueeze(0).expand(batch, -1)
    positions = [p - p0 for p in prepared.insert_positions]
    k = len(lower_blocks) if lower_blocks and state.hidden is not None else 0
    with ExitStack() as stack:
        if k:
            hidden_k = state.hidden[k][:, p0:].expand(batch, -1, -1)
            stack.enter_context(_shared_lower_blocks(lower_blocks, block, hidden_k))
        stack.enter_context(inject(block, positions, vectors, mode, strength, plain_rows))
        stack.enter_context(record_function("selfie.prefill"))  # named spans for profiles (benchmarks/)
        logits, cache, _ = forward(model, suffix, cache=cache, logits_to_keep=1)
    for i in range(k):  # the skipped blocks' cache: the prompt run's keys and values after the shared prefix
        key, value = state.kv[i]
        cache.layers[i].update(key[:, :, p0:].expand(batch, -1, -1, -1), value[:, :, p0:].expand(batch, -1, -1, -1))
    generators = None
    if do_sample:
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        generators = []
        # unseeded rows draw fresh seeds without touching torch's global generators (torch.seed() reseeds them)
        for s in row_seeds if row_seeds is not None else [secrets.randbits(63) for _ in range(batch)]:
            g = torch.Generator(device=gen_device)
            g.manual_seed(int(s))
            generators.append(g)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=device)
    if decode != "growing" and static_decoding_supported(model, cache):
        decoder = StaticDecoder(model, cache, state.length, graphs=decode == "graphs", attention=decode_attention)
    else:
        decoder = GrowingDecoder(model, cache)
    # Tokens and their probabilities stay on the device, one column per step, indexed by original row; a row's
    # output ends at its first EOS (a row kept in the batch after EOS writes ignored columns).
    chosen = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
    chosen_p = torch.zeros((batch, max_new_tokens), dtype=torch.promote_types(logits.dtype, torch.float32), device=device)
    active = torch.arange(batch, device=device)  # original row of each current batch row
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool)  # by original row, on the host: the watch's answers
    step_logits = logits[:, -1]
    with record_function("selfie.decode"), closing(decoder):
        for step in range(max_new_tokens):
            step_logits = wide(step_logits)
            tokens = _choose(step_logits, do_sample, temperature, top_p, generators)
            chosen[active, step] = tokens
            chosen_p[active, step] = torch.softmax(step_logits, -1).gather(-1, tokens[:, None])[:, 0]
            if step == max_new_tokens - 1:
                break
            finished |= torch.isin(tokens, eos)
            if watch is not None:
                still = active[~finished].tolist()
                stop = set(watch(step + 1, max_new_tokens, still)) & set(still)
                if stop:
                    stopped[list(stop)] = True
                    finished |= stopped.to(device)[active]
            count = int(finished.sum())  # the one wait for the device per step
            if count == len(finished):
                break
            if decoder.prune_now(count, len(finished)):
                keep = (~finished).nonzero()[:, 0]
                decoder.keep(keep)
                tokens, active, finished = tokens[keep], active[keep], finished[keep]
                if generators is not None:
                    generators = [generators[i] for i in keep.tolist()]
            step_logits = decoder.step(tokens)
    rows = []
    eos_set = set(eos_ids)
    for ids, probs, stop in zip(chosen.tolist(), chosen_p.tolist(), stopped.tolist()):
        end = next((i + 1 for i, tok in enumerate(ids) if tok in eos_set), len(ids))
        rows.append(GeneratedRow(ids[:end], probs[:end], stopped=stop))
    return rows
