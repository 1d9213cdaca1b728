"""Plain text generation (no injection): greedy or sampled, batched, left-padded.

``generate``: Hugging Face's ``generate`` over left-padded batches, for the checks around edits. ``stream_generations``
(and ``generate_texts`` in process): the `generate` job kind's loop, whose every row gives the same tokens in any
batch as alone (its padding masked, its positions its own, a sampled row drawn from a generator of its own seeded by
the job's seed and the row's index), with a cancel check between decode steps.

``edit`` swaps an edited MLP in for the call (``selfie_core.weights``); the model's own weights are back after.
Logits that are not finite (NaN weights, a diverged variant) raise ``SelfieInputError`` instead of yielding tokens.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator, Sequence

import torch

from .engine import model_lock
from .errors import SelfieInputError
from .generation import _choose
from .modelcall import attention_kernels, forward, select_rows, wide
from .templates import InterpretationTemplate, chat_prompt
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


# -- generation of prompts as jobs (the `generate` kind) and in process ------------------------------------------

#: Why a generation ended: the model emitted an end-of-sequence id, or ``max_new_tokens`` were generated.
FINISH_EOS = "eos"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class GeneratedText:
    """One prompt's continuation: ``token_ids`` as generated (an ending EOS included), ``text`` decoded without
    it (special tokens skipped), ``finish`` one of ``FINISH_EOS`` / ``FINISH_LENGTH``."""

    key: Any
    text: str
    token_ids: tuple[int, ...]
    finish: str


def prompt_ids(tokenizer, prompt: str, *, chat: bool, system: str | None = None,
               default_system: bool = False) -> list[int]:
    """The token ids a generation starts from: ``prompt`` as one user turn in the tokenizer's chat template with the
    generation prompt (``chat``), or the raw text. Tokenized as interpretation prompts are (the tokenizer's own
    special tokens, e.g. BOS). ``system``: a system turn; without one there is none (a chat template's default
    system prompt is cut out, as interpretation presets do) unless ``default_system``."""
    if not chat:
        if system is not None:
            raise SelfieInputError("a raw prompt has no system turn: use the chat format for a system prompt")
        return list(tokenizer(prompt).input_ids)
    if not getattr(tokenizer, "chat_template", None):
        raise SelfieInputError("this model's tokenizer has no chat template: generate from raw text instead")
    return list(tokenizer(chat_prompt(tokenizer, prompt, system=system, default_system=default_system)).input_ids)


def eos_ids(model, tokenizer) -> list[int]:
    """The ids that end a generation: the model's generation config's and config's, and the tokenizer's."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    return sorted(found)


def row_seed(seed: int, index: int) -> int:
    """The seed of the generator that samples prompt ``index`` of a job (or of a call): a sample depends on the
    seed and the prompt's place only, never on the other prompts of its batch."""
    digest = hashlib.blake2b(b"generate\x00" + index.to_bytes(8, "little", signed=True)
                             + seed.to_bytes(16, "little", signed=True), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def check_lengths(rows: Sequence[Sequence[int]], max_new_tokens: int, max_context: int | None) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise SelfieInputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    for i, ids in enumerate(rows):
        if not ids:
            raise SelfieInputError(f"prompt {i} has no tokens")
        if max_context is not None and len(ids) + max_new_tokens > max_context:
            raise SelfieInputError(f"prompt {i} has {len(ids)} tokens (as the model reads it) + max_new_tokens "
                                   f"({max_new_tokens}) exceed the model's context ({max_context} tokens)")


#: Asked before a batch and between decode steps with the keys of the rows still decoding; returns those to drop.
ShouldStop = Callable[[list[Any]], Collection[Any]]


def stream_generations(model, tokenizer, rows: Sequence[Sequence[int]], max_new_tokens: int, *,
                       keys: Sequence[Any] | None = None, indices: Sequence[int] | None = None,
                       do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                       seed: int | None = None, batch_size: int = 64, edit: MLPEdit | None = None,
                       should_stop: ShouldStop | None = None,
                       on_step: Callable[[int, int, int], None] | None = None) -> Iterator[list[GeneratedText]]:
    """Generate from each row of token ids (``prompt_ids``), ``batch_size`` rows at a time, left-padded; yields one
    list per batch, in row order. A row's result is the same in any batch: its padding is masked and its positions
    count from its first token; a sampled row draws from a generator of its own, seeded by ``row_seed(seed,
    indices[i])`` (``indices`` default to the rows' places; unseeded: fresh seeds). A row ``should_stop`` names
    (by ``keys[i]``, default its place) gets no result. ``edit``: an edited MLP swapped in for the batches."""
    keys = list(range(len(rows))) if keys is None else list(keys)
    indices = list(range(len(rows))) if indices is None else list(indices)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    for start in range(0, len(rows), batch_size):
        span = range(start, min(start + batch_size, len(rows)))
        if should_stop is not None:
            stop = set(should_stop([keys[i] for i in span]))
            span = [i for i in span if keys[i] not in stop]
        if not span:
            continue
        seeds = None
        if do_sample:
            seeds = [row_seed(seed, indices[i]) if seed is not None else secrets.randbits(63) for i in span]
        # the model's lock: a batch of another thread (an interpretation with its hooks) never runs meanwhile
        with model_lock(model), swapped_in(model, edit):
            got = _generate_rows(model, [rows[i] for i in span], [keys[i] for i in span], max_new_tokens, eos, pad,
                                 do_sample=do_sample, temperature=temperature, top_p=top_p, seeds=seeds,
                                 should_stop=should_stop, on_step=on_step)
        out = []
        for i, ids in zip(span, got):
            if ids is None:
                continue  # stopped while decoding
            ended = bool(ids) and ids[-1] in eos
            text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
            out.append(GeneratedText(keys[i], text, tuple(ids), FINISH_EOS if ended else FINISH_LENGTH))
        yield out


def _check_finite(logits: torch.Tensor, step: int) -> None:
    """Refuse to choose from logits that are not finite: argmax would answer token 0 (greedy) or a NaN draw any
    token (sampled), both stored as if the model had said them."""
    if not bool(torch.isfinite(logits).all()):
        raise SelfieInputError(f"the model's logits are not finite (NaN/inf) at decode step {step}: its weights (or "
                               "the variant's) give no distribution to generate from")


@torch.inference_mode()
def _generate_rows(model, rows, keys, max_new_tokens, eos, pad, *, do_sample, temperature, top_p, seeds,
                   should_stop, on_step) -> list[list[int] | None]:
    """One left-padded batch: the generated ids of each row (None for a row stopped on request)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # positions count from each row's first real token, as in a batch of one (the padding's are never read)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    generators = None
    if do_sample:
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        generators = []
        for s in seeds:
            g = torch.Generator(device=gen_device)
            g.manual_seed(int(s))
            generators.append(g)
    with attention_kernels(device):
        logits, cache, _ = forward(model, ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        eos_t = torch.tensor(sorted(set(eos)) or [-1], device=device)
        chosen: list[list[int]] = [[] for _ in rows]
        stopped = [False] * len(rows)
        active = list(range(len(rows)))  # original row of each current batch row
        last = positions[:, -1]
        step_logits = logits[:, -1]
        for step in range(max_new_tokens):
            _check_finite(step_logits, step)
            tokens = _choose(wide(step_logits), do_sample, temperature, top_p, generators)
            for row, token in zip(active, tokens.tolist()):
                chosen[row].append(token)
            if step == max_new_tokens - 1:
                break
            done = torch.isin(tokens, eos_t).tolist()
            if on_step is not None:
                on_step(step + 1, max_new_tokens, sum(1 for d in done if not d))
            if should_stop is not None:
                going = [keys[row] for row, d in zip(active, done) if not d]
                stop = set(should_stop(going)) if going else set()
                for n, row in enumerate(active):
                    if not done[n] and keys[row] in stop:
                        stopped[row] = done[n] = True
            if all(done):
                break
            if any(done):  # finished rows leave the batch: every later step is cheaper
                keep = [n for n, d in enumerate(done) if not d]
                index = torch.tensor(keep, device=device)
                select_rows(cache, index)
                tokens, mask, last = tokens[index], mask[index], last[index]
                active = [active[n] for n in keep]
                if generators is not None:
                    generators = [generators[n] for n in keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            last = last + 1
            step_logits, cache, _ = forward(model, tokens[:, None], cache=cache, attention_mask=mask,
                                            position_ids=last[:, None], logits_to_keep=1)
            step_logits = step_logits[:, -1]
    return [None if stopped[i] else chosen[i] for i in range(len(rows))]


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *, chat: bool = True,
                   system: str | None = None, default_system: bool = False, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, batch_size: int = 64,
                   edit: MLPEdit | None = None, max_context: int | None = None,
                   indices: Sequence[int] | None = None) -> list[GeneratedText]:
    """Every prompt's generation, in order: ``prompt_ids`` then ``stream_generations`` (what a `generate` job
    runs), in process. ``indices``: each prompt's index for its sample's seed (default: its place in
    ``prompts``; a job's prompt keeps its index in the job)."""
    rows = [prompt_ids(tokenizer, p, chat=chat, system=system, default_system=default_system) for p in prompts]
    check_lengths(rows, max_new_tokens, max_context)
    return [g for batch in stream_generations(model, tokenizer, rows, max_new_tokens, do_sample=do_sample,
                                              temperature=temperature, top_p=top_p, seed=seed,
                                              batch_size=batch_size, edit=edit, indices=indices) for g in batch]
