"""Lenses: simpler readings of a hidden state that SelfIE is compared with, each scored against the model's own
next-token prediction at the state's position.

- logit lens: the model's final norm and output layer applied to ``hidden_states[layer][token]``; at
  ``layer == num_layers`` the state is already the final norm's output (``extraction``), so only the output layer
  is applied and the lens equals the model's own logits there;
- identity patch (Patchscopes' token-identity prompt ``IDENTITY_PROMPT``): the state replaces the residual stream
  at the prompt's last position at the same layer it came from (the input of block ``layer``; the final norm's
  output for ``layer == num_layers``), and the model predicts one next token;
- the model's own prediction at ``(prompt, token)``: the output layer over ``hidden_states[num_layers][token]``.

``run_lenses`` is batched: one extraction forward per prompt batch (``SelfieEngine.hidden_states``), the logit
lens as one matrix product per batch, and the identity patch as one forward of the identity prompt per batch with
each row's state written at its own layer. ``reference_lenses`` is the naive per-item path it is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import get_adapter, module_device
from .errors import SelfieInputError
from .modelcall import attention_kernels, forward, wide
from .records import InterpretRequest
from .validation import check_interpret_request

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
LENS_NAMES = ("logit", "identity")
MAX_TOP_K = 100


@dataclass(frozen=True)
class LensRequest:
    """Read ``hidden_states[layer][token]`` of ``prompt`` (indices as ``InterpretRequest``'s)."""

    prompt: str
    layer: int
    token: int
    key: Any = None


@dataclass(frozen=True)
class TopTokens:
    token_ids: list[int]
    tokens: list[str]
    probs: list[float]


@dataclass(frozen=True)
class LensReading:
    """One state read by each lens asked for; ``model`` is the model's own next-token prediction there.
    ``*_model_prob``: the probability the lens gives the model's top-1 token."""

    key: Any
    prompt: str
    layer: int
    token: int
    source_token: str
    model: TopTokens
    logit: TopTokens | None
    logit_model_prob: float | None
    identity: TopTokens | None
    identity_model_prob: float | None

    def matches(self, lens: str) -> bool | None:
        """Whether the lens's top-1 token is the model's (None when the lens was not run)."""
        got: TopTokens | None = getattr(self, lens)
        return None if got is None else got.token_ids[0] == self.model.token_ids[0]


def check_lenses(lenses: Sequence[str], top_k: int, vocab_size: int) -> None:
    unknown = [name for name in lenses if name not in LENS_NAMES]
    if unknown or not lenses:
        raise SelfieInputError(f"unknown lens {unknown[0]!r}; known: {', '.join(LENS_NAMES)}" if unknown
                               else "ask for at least one lens")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= min(MAX_TOP_K, vocab_size):
        raise SelfieInputError(f"top_k={top_k!r} is out of range: use 1..{min(MAX_TOP_K, vocab_size)}")


def output_logits(model, states: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits for residual-stream ``states`` (rows, hidden): the final norm applied to the
    rows not yet ``normed`` (a bool per row), then the output layer (and a final soft-cap where the model has one,
    as its forward applies it)."""
    adapter = get_adapter(model)
    head = model.get_output_embeddings()
    if adapter.final_norm is not None and not bool(normed.all()):
        norm_device = module_device(adapter.final_norm)
        raw = states.to(norm_device)
        done = adapter.final_norm(raw)
        keep = normed.to(norm_device)[:, None]
        states = torch.where(keep, raw, done)
    logits = head(states.to(module_device(head)))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def top_tokens(tokenizer, probs: torch.Tensor, k: int) -> list[TopTokens]:
    values, ids = probs.topk(k, dim=-1)
    out = []
    for row_ids, row_values in zip(ids.tolist(), values.tolist()):
        out.append(TopTokens(row_ids, [tokenizer.decode([i]) for i in row_ids], [float(v) for v in row_values]))
    return out


@contextmanager
def _patched_last_position(model, layers: Sequence[int], states: torch.Tensor):
    """While open, the model's next forward of len(layers) rows writes row i's state at the last position of the
    input of block ``layers[i]`` (the final norm's output for ``num_layers``). Each hook fires once."""
    adapter = get_adapter(model)
    by_layer: dict[int, list[int]] = {}
    for row, layer in enumerate(layers):
        by_layer.setdefault(layer, []).append(row)

    def write(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        out = hidden.clone()
        index = torch.tensor(rows, device=hidden.device)
        out[index, -1] = states[rows].to(device=hidden.device, dtype=hidden.dtype)
        return out

    def pre_hook(rows):
        def hook(module, args, kwargs):
            if args:
                return (write(args[0], rows), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"], rows)}
        return hook

    def post_hook(rows):
        return lambda module, args, output: write(output, rows)

    with ExitStack() as stack:
        for layer, rows in by_layer.items():
            if layer < adapter.num_layers:
                handle = adapter.blocks[layer].register_forward_pre_hook(pre_hook(rows), with_kwargs=True)
            else:
                handle = adapter.final_norm.register_forward_hook(post_hook(rows))
            stack.callback(handle.remove)
        yield


def identity_logits(model, prompt_ids: Sequence[int], states: torch.Tensor, layers: Sequence[int],
                    device: torch.device) -> torch.Tensor:
    """Next-token logits of the identity prompt with row i's state patched at its last position at ``layers[i]``."""
    ids = torch.tensor([list(prompt_ids)], device=device).expand(len(layers), -1)
    with _patched_last_position(model, layers, states):
        logits, _, _ = forward(model, ids, logits_to_keep=1, use_cache=False)
    return logits[:, -1]


def _source_tokens(tokenizer, ids: list[int], token: int) -> str:
    return tokenizer.decode([ids[token]])


def run_lenses(engine, requests: Sequence[LensRequest], lenses: Sequence[str] = LENS_NAMES, top_k: int = 5,
               batch_size: int | None = None, *, should_stop=None) -> Iterator[list[LensReading]]:
    """Validate every request, then yield the readings of each batch of ``batch_size`` rows (request order).
    ``should_stop(keys)`` (as ``SelfieEngine.stream``'s): asked before each batch; the requests whose keys it
    returns are not read (a batch is one forward pass: there is nothing to stop inside it)."""
    tokenizer = engine.tokenizer
    vocab = int(engine.model.get_output_embeddings().weight.shape[0])
    check_lenses(lenses, top_k, vocab)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise SelfieInputError(f"batch_size={batch_size!r}: give a positive integer")
    requests = list(requests)
    ids_of: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        if not isinstance(req, LensRequest):
            raise SelfieInputError(f"request {i}: expected a LensRequest, got {type(req).__name__}")
        ids = None
        if isinstance(req.prompt, str) and req.prompt.strip():
            ids = ids_of.get(req.prompt) or ids_of.setdefault(req.prompt, list(tokenizer(req.prompt).input_ids))
        check_interpret_request(InterpretRequest(req.prompt, req.layer, req.token), ids, engine.num_layers,
                                engine.max_context, f"request {i}")
    return _readings(engine, requests, ids_of, tuple(lenses), top_k, batch_size or 256, should_stop)


def _readings(engine, requests, ids_of, lenses, top_k, size, should_stop=None) -> Iterator[list[LensReading]]:
    last = engine.num_layers
    identity_ids = list(engine.tokenizer(IDENTITY_PROMPT).input_ids)
    for start in range(0, len(requests), size):
        batch = requests[start : start + size]
        if should_stop is not None:
            stop = set(should_stop([r.key for r in batch]))
            batch = [r for r in batch if r.key not in stop]
            if not batch:
                continue
        wanted: dict[str, set[tuple[int, int]]] = {}
        for req in batch:
            wanted.setdefault(req.prompt, set()).update({(req.layer, req.token), (last, req.token)})
        # computed inside the modes and the lock, yielded outside them: the consumer runs between batches
        with torch.inference_mode():
            states = engine.hidden_states({p: sorted(pairs) for p, pairs in wanted.items()})
            with engine._lock, attention_kernels(engine.input_device):
                readings = _read_batch(engine, batch, states, ids_of, lenses, top_k, identity_ids)
        yield readings


def _read_batch(engine, batch, states, ids_of, lenses, top_k, identity_ids) -> list[LensReading]:
    model, tokenizer, last = engine.model, engine.tokenizer, engine.num_layers
    device = engine.input_device
    layers = [req.layer for req in batch]
    read = torch.stack([states[r.prompt][(r.layer, r.token)].to(device) for r in batch])
    final = torch.stack([states[r.prompt][(last, r.token)].to(device) for r in batch])
    model_probs = torch.softmax(wide(output_logits(model, final, torch.ones(len(batch), dtype=torch.bool))), -1)
    model_top = model_probs.argmax(-1)
    own = top_tokens(tokenizer, model_probs, top_k)
    found: dict[str, tuple[list[TopTokens], list[float]]] = {}
    for lens in lenses:
        if lens == "logit":
            logits = output_logits(model, read, torch.tensor([layer == last for layer in layers]))
        else:
            logits = identity_logits(model, identity_ids, read, layers, device)
        probs = torch.softmax(wide(logits), -1)
        at_model_top = probs.gather(-1, model_top.to(probs.device)[:, None])[:, 0].tolist()
        found[lens] = (top_tokens(tokenizer, probs, top_k), at_model_top)
    out = []
    for i, req in enumerate(batch):
        logit = found.get("logit")
        identity = found.get("identity")
        out.append(LensReading(
            key=req.key, prompt=req.prompt, layer=req.layer, token=req.token,
            source_token=_source_tokens(tokenizer, ids_of[req.prompt], req.token), model=own[i],
            logit=logit[0][i] if logit else None, logit_model_prob=logit[1][i] if logit else None,
            identity=identity[0][i] if identity else None, identity_model_prob=identity[1][i] if identity else None,
        ))
    return out


@torch.inference_mode()
def reference_lenses(model, tokenizer, requests: Sequence[LensRequest], lenses: Sequence[str] = LENS_NAMES,
                     top_k: int = 5) -> list[LensReading]:
    """The naive path, one item at a time: a forward of the source prompt, the final norm and output layer applied
    by hand, and a forward of the identity prompt with one hook on the one block (or the final norm)."""
    adapter = get_adapter(model)
    device = adapter.embedding_device()
    last = adapter.num_layers
    identity_ids = torch.tensor([tokenizer(IDENTITY_PROMPT).input_ids], device=device)
    out = []
    for req in requests:
        ids = list(tokenizer(req.prompt).input_ids)
        run = model(torch.tensor([ids], device=device), output_hidden_states=True)
        state = run.hidden_states[req.layer][0, req.token]
        model_probs = torch.softmax(wide(run.logits[0, req.token]), -1)
        top = int(model_probs.argmax())
        readings: dict[str, tuple[TopTokens, float]] = {}
        for lens in lenses:
            if lens == "logit":
                x = state if req.layer == last else adapter.final_norm(state)
                logits = model.get_output_embeddings()(x)
                cap = getattr(model.config, "final_logit_softcapping", None)
                if cap:
                    logits = torch.tanh(logits / cap) * cap
            else:
                def put_last(hidden):
                    hidden = hidden.clone()
                    hidden[0, -1] = state
                    return hidden

                if req.layer < last:
                    handle = adapter.blocks[req.layer].register_forward_pre_hook(
                        lambda m, a, kw: ((put_last(a[0]), *a[1:]), kw) if a
                        else (a, {**kw, "hidden_states": put_last(kw["hidden_states"])}), with_kwargs=True)
                else:
                    handle = adapter.final_norm.register_forward_hook(lambda m, a, o: put_last(o))
                try:
                    logits = model(identity_ids).logits[0, -1]
                finally:
                    handle.remove()
            probs = torch.softmax(wide(logits), -1)
            readings[lens] = (top_tokens(tokenizer, probs[None], top_k)[0], float(probs[top]))
        out.append(LensReading(
            key=req.key, prompt=req.prompt, layer=req.layer, token=req.token,
            source_token=tokenizer.decode([ids[req.token]]), model=top_tokens(tokenizer, model_probs[None], top_k)[0],
            logit=readings["logit"][0] if "logit" in readings else None,
            logit_model_prob=readings["logit"][1] if "logit" in readings else None,
            identity=readings["identity"][0] if "identity" in readings else None,
            identity_model_prob=readings["identity"][1] if "identity" in readings else None,
        ))
    return out
