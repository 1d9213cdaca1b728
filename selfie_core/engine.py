"""``SelfieEngine``: validate requests, then extract -> inject at block k -> generate -> relevancy, in batches."""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
from torch.profiler import record_function

from . import triton_norm
from .adapters import get_adapter, module_device
from .decoding import check_step_attention
from .errors import SelfieInputError
from .extraction import extract
from .memory import row_bytes, rows_that_fit
from .generation import PromptState, generate_batch, prepare_prompt_state
from .grounding import Baseline, GroundingConfig, judge

#: ``SelfieEngine.stream``'s callbacks: which of these request keys to drop; how far the running batch is.
ShouldStop = Callable[[list[Any]], Collection[Any]]
OnStep = Callable[[int, int, int], None]
from .modelcall import attention_kernels, sliding_window
from .records import GenerationConfig, InjectionConfig, Interpretation, InterpretRequest, VectorRequest
from .relevancy import no_inject_probs, relevancy_scores
from .templates import InterpretationTemplate, PreparedPrompt
from .validation import check_batch_size, check_generation, check_injection, check_interpret_request, vector_tensor
from .weights import weights_key

TemplateLike = InterpretationTemplate | dict | Sequence | str | None

log = logging.getLogger(__name__)


def as_template(template: TemplateLike, tokenizer=None) -> InterpretationTemplate:
    """Accept a template, its ``to_dict()`` form, a parts sequence, a preset name, or ``{"preset": name,
    "system": text}`` (a preset with a system prompt; none by default)."""
    if template is None:
        return InterpretationTemplate()
    if isinstance(template, InterpretationTemplate):
        return template
    if isinstance(template, dict) and "preset" in template and "parts" not in template:
        unknown = sorted(set(template) - {"preset", "system"})
        if unknown:
            raise SelfieInputError(f"a preset template takes 'preset' and 'system', not {', '.join(unknown)}")
        return InterpretationTemplate.preset(template["preset"], tokenizer, system=template.get("system"))
    if isinstance(template, dict):
        return InterpretationTemplate.from_dict(template)
    if isinstance(template, str):
        return InterpretationTemplate.preset(template, tokenizer)
    return InterpretationTemplate(parts=tuple(template))


def _eos_ids(model, tokenizer, gen: GenerationConfig) -> list[int]:
    if gen.eos_token_ids is not None:
        return list(gen.eos_token_ids)
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


# One lock per model: a batch hooks the model (injection, skipped blocks, swapped norms), so threads that share a
# model take turns batch by batch instead of firing each other's hooks.
_model_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_model_locks_guard = threading.Lock()


def model_lock(model) -> threading.RLock:
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.RLock()
        return lock


def graphs_off_reason(model, adapter) -> str | None:
    """Why decode steps cannot be captured as CUDA graphs for this placement of the model (None: they can).

    A captured step keeps its cache position in one device tensor and its buffers at fixed addresses: blocks on
    several devices would each need their own, and an offloaded block copies its weights in during the forward."""
    devices = adapter.devices()
    if len(devices) > 1:
        return (f"its blocks compute on {len(devices)} devices ({', '.join(map(str, devices))}); decode steps run "
                "eagerly over a cache that grows")
    offloaded = [name for name, module in model.named_modules()
                 if any(getattr(h, "offload", False)
                        for h in getattr(getattr(module, "_hf_hook", None), "hooks", None)
                        or [getattr(module, "_hf_hook", None)])]
    if offloaded:
        return f"{len(offloaded)} module(s) are offloaded (e.g. {offloaded[0]}); decode steps run eagerly"
    if sliding_window(model) is not None:
        return ("its sliding-window layers keep a cache of their own kind, which is not preallocated; decode steps "
                "run eagerly over a cache that grows")
    return None


def _row_seed(seed: int, identity: bytes) -> int:
    digest = hashlib.blake2b(identity + seed.to_bytes(16, "little", signed=True), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SelfieEngine:
    """Runs SelfIE interpretations on one resident model.

    ``SelfieEngine(load_model(...))`` or ``SelfieEngine(model, tokenizer)``. ``batch_size`` (rows per engine
    batch) defaults to 256 on CPU and to what free GPU memory allows on CUDA. ``cuda_graphs`` (default on): on
    CUDA, run the decode steps as CUDA graphs (``selfie_core.decoding``); on an H200 with a 7B-shaped model they
    gave 1.9x the eager steps' throughput at 64 rows per batch and 1.0-1.2x at 640 (benchmarks/README.md); no
    effect on the CPU. ``decode_attention``: how those CUDA steps attend, "sdpa" (the model's own attention) or
    "triton" (``selfie_core.triton_attention``, a single-query kernel; opt-in until it is measured on a GPU).
    ``rms_norm``: "model" (the model's own RMSNorm modules) or "triton" (``selfie_core.triton_norm``: each norm
    one kernel, in the prefill, decode steps and no-inject pass; opt-in until it is measured on a GPU).
    Threads may share an engine or a model: batches on one model run one at a time (``model_lock``).
    """

    def __init__(self, model, tokenizer=None, *, name: str | None = None, batch_size: int | None = None,
                 max_extract_tokens: int = 16384, cuda_graphs: bool = True, decode_attention: str = "sdpa",
                 rms_norm: str = "model"):
        check_step_attention(decode_attention)
        triton_norm.check_choice(rms_norm)
        check_batch_size(batch_size)
        if hasattr(model, "model") and hasattr(model, "tokenizer") and tokenizer is None:
            name = name or getattr(model, "name", None)
            model, tokenizer = model.model, model.tokenizer
        if tokenizer is None:
            raise TypeError("SelfieEngine needs a tokenizer (or a LoadedModel)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapter = get_adapter(model)
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.batch_size = batch_size
        self.max_extract_tokens = max_extract_tokens
        self.cuda_graphs = cuda_graphs
        self.decode_attention = decode_attention
        self.rms_norm = rms_norm
        if rms_norm == "triton":
            triton_norm.check_device(self.input_device)
        self._states: OrderedDict[tuple, PromptState] = OrderedDict()
        self._baselines: OrderedDict[tuple, Baseline] = OrderedDict()
        self._lock = model_lock(self.model)
        self.graphs_off_reason = graphs_off_reason(self.model, self.adapter) if cuda_graphs else None
        if self.graphs_off_reason and self.input_device.type == "cuda":
            log.warning("CUDA graphs are off for %s: %s", self.name, self.graphs_off_reason)

    # -- model facts ---------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def hidden_size(self) -> int:
        return int(self.adapter.embeddings.weight.shape[1])

    @property
    def max_context(self) -> int | None:
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def input_device(self) -> torch.device:
        return self.adapter.embedding_device()

    @property
    def pad_id(self) -> int:
        for value in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    def model_card(self) -> dict:
        """JSON-serialisable facts a process without torch needs to validate requests for this model."""
        from .cardinfo import model_card

        return model_card(self)

    # -- validation ----------------------------------------------------------------------------------------
    def _prepare(self, template: TemplateLike) -> PreparedPrompt:
        return as_template(template, self.tokenizer).prepare(self.tokenizer)

    def validate(self, requests: Sequence[InterpretRequest | VectorRequest], template: TemplateLike = None,
                 injection: InjectionConfig | None = None, generation: GenerationConfig | None = None) -> None:
        """Raise ``SelfieInputError`` for the first problem found; return None when everything can run."""
        self._validated(requests, template, injection, generation)

    def _validated(self, requests, template, injection, generation):
        injection = injection or InjectionConfig()
        generation = generation or GenerationConfig()
        if isinstance(requests, (InterpretRequest, VectorRequest)):
            raise SelfieInputError("pass a list of requests, not a single request")
        if isinstance(injection, dict):
            injection = InjectionConfig.from_dict(injection)
        if isinstance(generation, dict):
            generation = GenerationConfig.from_dict(generation)
        prepared = self._prepare(template)
        check_injection(injection, self.num_layers)
        check_generation(generation, prepared, self.max_context, sliding_window(self.model))
        token_ids: dict[str, list[int]] = {}
        vectors: dict[int, torch.Tensor] = {}
        for i, req in enumerate(requests):
            where = f"request {i}"
            if isinstance(req, VectorRequest):
                vectors[i] = vector_tensor(req, self.hidden_size, where)
                continue
            ids = None
            if isinstance(req, InterpretRequest) and isinstance(req.prompt, str) and req.prompt.strip():
                ids = token_ids.get(req.prompt)
                if ids is None:
                    ids = token_ids[req.prompt] = list(self.tokenizer(req.prompt).input_ids)
            check_interpret_request(req, ids, self.num_layers, self.max_context, where)
        return prepared, injection, generation, token_ids, vectors

    # -- running -------------------------------------------------------------------------------------------
    def interpret(self, requests: Sequence[InterpretRequest | VectorRequest], template: TemplateLike = None,
                  injection: InjectionConfig | None = None, generation: GenerationConfig | None = None,
                  batch_size: int | None = None, grounding: GroundingConfig | dict | None = None,
                  ) -> list[Interpretation]:
        """Interpret every request; results come back in request order."""
        results: list[Interpretation] = []
        for batch in self.stream(requests, template, injection, generation, batch_size, grounding):
            results.extend(batch)
        return results

    def hidden_states(self, wanted: dict[str, Sequence[tuple[int, int]]]) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
        """``{prompt: {(layer, token): hidden_states[layer][token]}}`` for every pair asked of each prompt.

        Layer and token follow ``InterpretRequest`` (token negative counts from the end; the keys of the answer are
        the indices as asked). One forward per prompt batch, as interpretation extracts them.
        """
        prompts = list(wanted)
        token_ids: list[list[int]] = []
        pairs: list[list[tuple[int, int]]] = []
        for i, prompt in enumerate(prompts):
            ids = None
            if isinstance(prompt, str) and prompt.strip():
                ids = list(self.tokenizer(prompt).input_ids)
            resolved = []
            for layer, token in wanted[prompt]:
                if ids is not None and isinstance(token, int) and not isinstance(token, bool) and token < 0:
                    token += len(ids)
                check_interpret_request(InterpretRequest(prompt, layer, token), ids, self.num_layers,
                                        self.max_context, f"state {i}")
                resolved.append((layer, token))
            token_ids.append(ids)
            pairs.append(sorted(set(resolved)))
        with self._lock, attention_kernels(self.input_device):
            got = extract(self.model, token_ids, pairs, self.pad_id, self.input_device, self.max_extract_tokens)
        out: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        for prompt, ids, states in zip(prompts, token_ids, got):
            out[prompt] = {(layer, token): states[(layer, token + len(ids) if token < 0 else token)]
                           for layer, token in wanted[prompt]}
        return out

    def interpret_vectors(self, vectors: Sequence[VectorRequest | Any], template: TemplateLike = None,
                          injection: InjectionConfig | None = None, generation: GenerationConfig | None = None,
                          batch_size: int | None = None, grounding: GroundingConfig | dict | None = None,
                          ) -> list[Interpretation]:
        """Interpret arbitrary vectors (``VectorRequest`` or raw tensors/lists of the model's hidden size)."""
        reqs = [v if isinstance(v, VectorRequest) else VectorRequest(v) for v in vectors]
        return self.interpret(reqs, template, injection, generation, batch_size, grounding)

    def stream(self, requests: Sequence[InterpretRequest | VectorRequest], template: TemplateLike = None,
               injection: InjectionConfig | None = None, generation: GenerationConfig | None = None,
               batch_size: int | None = None, grounding: GroundingConfig | dict | None = None, *,
               should_stop: ShouldStop | None = None,
               on_step: OnStep | None = None) -> Iterator[list[Interpretation]]:
        """Validate everything first, then yield one list of results per finished engine batch (request order).
        Each result says whether it is grounded (``selfie_core.grounding``; ``grounding`` sets the threshold).

        ``should_stop(keys)``: asked with the requests' keys (which must then be hashable) before each engine batch
        and between its decode steps; the keys it returns are dropped: a request stopped before its batch is not
        run, one stopped while decoding leaves the batch at once; neither gets a result. The other requests are
        computed exactly as without it (a request whose vector is shared with one that goes on gets its result).
        ``on_step(step, steps, rows)``: told after each decode step how far the batch is (``steps`` is
        max_new_tokens; rows that finish early end the batch sooner) and how many rows it decodes.
        """
        if isinstance(requests, (InterpretRequest, VectorRequest)):
            raise SelfieInputError("pass a list of requests, not a single request")
        requests = list(requests)
        check_batch_size(batch_size)
        grounding = grounding if isinstance(grounding, GroundingConfig) else GroundingConfig.from_dict(grounding)
        prepared, injection, generation, token_ids, raw_vectors = self._validated(requests, template, injection, generation)
        return self._run(requests, prepared, injection, generation, token_ids, raw_vectors, batch_size, grounding,
                         should_stop, on_step)

    def baseline(self, template: TemplateLike = None, generation: GenerationConfig | None = None) -> Baseline:
        """The interpretation prompt's own output with nothing injected (greedy or sampled as ``generation`` says;
        a seeded sample is the same each time). Kept per template, generation settings and weights."""
        generation = generation or GenerationConfig()
        if isinstance(generation, dict):
            generation = GenerationConfig.from_dict(generation)
        prepared = self._prepare(template)
        check_generation(generation, prepared, self.max_context, sliding_window(self.model))
        eos = _eos_ids(self.model, self.tokenizer, generation)
        norms = triton_norm.fused(self.model) if self.rms_norm == "triton" else nullcontext()
        with self._lock, attention_kernels(self.input_device), norms:
            return self._baseline(prepared, generation, eos, self._prompt_state(prepared))

    def _baseline(self, prepared: PreparedPrompt, generation: GenerationConfig, eos: list[int],
                  state: PromptState) -> Baseline:
        # under the model's lock, with the weights in use (as _prompt_state): an edit has a baseline of its own
        key = self._baseline_key(prepared, generation, eos)
        found = self._baselines.get(key)
        if found is not None:
            self._baselines.move_to_end(key)
            return found
        seeds = [_row_seed(generation.seed, b"baseline")] if generation.do_sample and generation.seed is not None else None
        zero = torch.zeros((1, self.hidden_size), dtype=self.adapter.embeddings.weight.dtype,
                           device=self.adapter.block_device(0))
        row = generate_batch(
            self.model, self.adapter.blocks[0], state, zero, mode="replace", strength=1.0,
            max_new_tokens=generation.max_new_tokens, eos_ids=eos, do_sample=generation.do_sample,
            temperature=float(generation.temperature) if generation.do_sample else 1.0,
            top_p=float(generation.top_p) if generation.do_sample else 1.0, row_seeds=seeds,
            device=self.input_device, decode="growing", plain_rows=[0],
        )[0]
        return self._keep_baseline(key, row.token_ids, eos)

    def _baseline_key(self, prepared: PreparedPrompt, generation: GenerationConfig, eos: list[int]) -> tuple:
        return (weights_key(self.model), prepared.input_ids, prepared.insert_positions,
                repr(sorted(generation.to_dict().items())), tuple(eos))

    def _keep_baseline(self, key: tuple, token_ids: list[int], eos: list[int]) -> Baseline:
        text_ids = token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids
        found = Baseline(self.tokenizer.decode(text_ids, skip_special_tokens=True), tuple(token_ids))
        self._baselines[key] = found
        while len(self._baselines) > 64:
            self._baselines.popitem(last=False)
        return found

    def _run(self, requests, prepared, injection, generation, token_ids, raw_vectors, batch_size, grounding,
             should_stop=None, on_step=None):
        if not requests:
            return
        size = batch_size or self.batch_size or self._auto_batch_size(len(prepared.input_ids), generation.max_new_tokens)
        if not batch_size and not self.batch_size:  # balance: 640 rows at most 565 a batch -> 2 x 320, not 565 + 75
            batches = -(-len(requests) // size)
            size = -(-len(requests) // batches)
        eos = _eos_ids(self.model, self.tokenizer, generation)
        # pairs still needed per prompt, so that a prompt is extracted once even when its rows span batches
        pending: dict[str, int] = {}
        pairs: dict[str, set] = {}
        for req in requests:
            if isinstance(req, InterpretRequest):
                pending[req.prompt] = pending.get(req.prompt, 0) + 1
                pairs.setdefault(req.prompt, set()).add((req.layer, req.token))
        extracted: dict[str, dict] = {}
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            positions = range(start, start + len(chunk))  # each request's index, for raw_vectors
            positions, chunk = self._not_stopped(chunk, positions, should_stop, pending, extracted)
            if not chunk:
                continue
            missing = list(dict.fromkeys(r.prompt for r in chunk if isinstance(r, InterpretRequest) and r.prompt not in extracted))
            if missing:
                with self._lock, attention_kernels(self.input_device):
                    got = extract(self.model, [token_ids[p] for p in missing], [sorted(pairs[p]) for p in missing],
                                  self.pad_id, self.input_device, self.max_extract_tokens)
                extracted.update(zip(missing, got))
                # asked again after the extraction (seconds for a large batch on a CPU): a cancel that came
                # meanwhile does not wait for the first decode step
                positions, chunk = self._not_stopped(chunk, positions, should_stop, pending, extracted)
                if not chunk:
                    continue
            vecs = []
            for i, req in zip(positions, chunk):
                if isinstance(req, InterpretRequest):
                    vecs.append(extracted[req.prompt][(req.layer, req.token)])
                    self._release(req.prompt, pending, extracted)
                else:
                    vecs.append(raw_vectors[i])
            device = self.adapter.block_device(injection.k)
            vectors = torch.stack([v.to(device) for v in vecs])
            yield self._run_batch(chunk, vectors, prepared, injection, generation, eos, token_ids, grounding,
                                  should_stop, on_step)

    def _not_stopped(self, chunk, positions, should_stop, pending, extracted):
        """`chunk` (and each request's index) without the requests `should_stop` names now."""
        if should_stop is None:
            return positions, chunk
        stop = set(should_stop([r.key for r in chunk]))
        if not stop:
            return positions, chunk
        for req in chunk:
            if req.key in stop and isinstance(req, InterpretRequest):
                self._release(req.prompt, pending, extracted)
        kept = [(i, r) for i, r in zip(positions, chunk) if r.key not in stop]
        return [i for i, _ in kept], [r for _, r in kept]

    @staticmethod
    def _release(prompt, pending, extracted) -> None:
        """One request of `prompt` is served (or dropped): its hidden states are freed after the last one."""
        pending[prompt] -= 1
        if pending[prompt] == 0:
            extracted.pop(prompt, None)

    def _run_batch(self, chunk, vectors, prepared, injection, generation, eos, token_ids, grounding,
                   should_stop=None, on_step=None) -> list[Interpretation]:
        norms = triton_norm.fused(self.model) if self.rms_norm == "triton" else nullcontext()
        with self._lock, attention_kernels(self.input_device), norms:
            # looked up per batch, under the lock: the weights in use (an edit swapped in) may differ between
            # batches of one stream, and the state must be the one of the weights this batch runs with
            state = self._prompt_state(prepared)
            # the baseline rides along in the first batch of its template, settings and weights (one row more),
            # instead of a generation of its own (a batch of one: 6-7% of a 132-row CPU run)
            key = self._baseline_key(prepared, generation, eos)
            baseline = self._baselines.get(key)
            out, plain = self._interpret_batch(chunk, vectors, state, injection, generation, eos, token_ids,
                                               with_baseline=baseline is None, should_stop=should_stop,
                                               on_step=on_step)
            if baseline is None and plain is not None:
                baseline = self._keep_baseline(key, plain, eos)
            elif baseline is not None:
                self._baselines.move_to_end(key)
        for result in out:  # (no baseline only when every row was stopped: then there is no result to judge)
            reason = judge(result.text, result.token_ids, result.mean_relevancy, baseline, grounding, eos)
            result.grounded, result.ungrounded_reason = reason is None, reason
        return out

    @staticmethod
    def _step_watch(chunk, unique_of, should_stop, on_step):
        """The decode loop's watch (``generation.StepWatch``) over distinct vectors: a row stops when every request
        it serves is stopped; progress is reported in requests. A row that serves no request (the baseline's) goes
        on while any other does, and stops with the last of them."""
        if should_stop is None and on_step is None:
            return None
        keys_of: dict[int, list] = {}
        for req, u in zip(chunk, unique_of):
            keys_of.setdefault(u, []).append(req.key)

        def watch(step, steps, rows):
            if on_step is not None:
                on_step(step, steps, sum(len(keys_of.get(u, ())) for u in rows))
            if should_stop is None:
                return ()
            serving = [u for u in rows if u in keys_of]
            stop = set(should_stop([k for u in serving for k in keys_of[u]]))
            stopped = [u for u in serving if stop and all(k in stop for k in keys_of[u])]
            if stopped and len(stopped) == len(serving):
                return list(rows)
            return stopped

        return watch

    def _interpret_batch(self, chunk, vectors, state, injection, generation, eos, token_ids,
                         with_baseline: bool = False, should_stop=None,
                         on_step=None) -> tuple[list[Interpretation], list[int] | None]:
        """The batch's results, and with ``with_baseline`` the token ids of one more row with nothing injected
        (None when the batch was stopped before that row finished)."""
        seeds = None
        if generation.do_sample and generation.seed is not None:
            seeds = [_row_seed(generation.seed, self._identity(req)) for req in chunk]
        # Greedy rows with bit-identical vectors (e.g. the first token of prompts that start alike, or layer 0 of
        # the same token) give identical results: run each distinct vector once.
        unique_of = list(range(len(chunk)))
        if not generation.do_sample:
            first: dict[bytes, int] = {}
            keep = []
            cpu = vectors.detach().to("cpu", torch.promote_types(vectors.dtype, torch.float32))
            for i in range(len(chunk)):
                j = first.setdefault(cpu[i].numpy().tobytes(), len(keep))
                if j == len(keep):
                    keep.append(i)
                unique_of[i] = j
            if len(keep) < len(chunk):
                vectors = vectors[torch.tensor(keep, device=vectors.device)]
        plain_rows = []
        if with_baseline:  # a last row whose vector is ignored: the prompt's own output
            plain_rows = [vectors.shape[0]]
            vectors = torch.cat([vectors, torch.zeros_like(vectors[:1])])
            if seeds is not None:
                seeds = [*seeds, _row_seed(generation.seed, b"baseline")]
        rows = generate_batch(
            self.model, self.adapter.blocks[injection.k], state, vectors, mode=injection.mode,
            strength=float(injection.strength), max_new_tokens=generation.max_new_tokens, eos_ids=eos,
            do_sample=generation.do_sample,
            temperature=float(generation.temperature) if generation.do_sample else 1.0,
            top_p=float(generation.top_p) if generation.do_sample else 1.0,
            row_seeds=seeds, device=self.input_device,
            lower_blocks=list(self.adapter.blocks[: injection.k]) if self.adapter.skippable else None,
            decode=self._decode_mode(), decode_attention=self.decode_attention, plain_rows=plain_rows,
            watch=self._step_watch(chunk, unique_of, should_stop, on_step),
        )
        plain_row = rows.pop() if with_baseline else None
        plain = plain_row.token_ids if plain_row is not None and not plain_row.stopped else None
        going = [u for u, r in enumerate(rows) if not r.stopped]
        with record_function("selfie.no_inject"):
            p_no = dict(zip(going, no_inject_probs(self.model, state, [rows[u].token_ids for u in going],
                                                   self.input_device)))
        out = []
        for req, u in zip(chunk, unique_of):
            if u not in p_no:
                continue  # stopped while decoding: no result
            row, pn = rows[u], p_no[u]
            rel = relevancy_scores(row.p_inject, pn)
            text_ids = row.token_ids[:-1] if row.token_ids and row.token_ids[-1] in eos else row.token_ids
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            if isinstance(req, InterpretRequest):
                src = self.tokenizer.decode([token_ids[req.prompt][req.token]])
                out.append(Interpretation(req.key, req.prompt, req.layer, req.token, src, text, list(row.token_ids), rel,
                                          sum(rel) / len(rel) if rel else 0.0))
            else:
                out.append(Interpretation(req.key, req.label or "", None, None, None, text, list(row.token_ids), rel,
                                          sum(rel) / len(rel) if rel else 0.0))
        return out, plain

    def _decode_mode(self) -> str:
        # on the CPU static steps cost 2-5% more than growing ones and there is no graph to gain
        if self.cuda_graphs and self.input_device.type == "cuda" and not self.graphs_off_reason:
            return "graphs"
        return "growing"

    @staticmethod
    def _identity(req) -> bytes:
        if isinstance(req, InterpretRequest):
            return f"{req.prompt}\x00{req.layer}\x00{req.token}".encode()
        vec = req.vector.detach().cpu() if isinstance(req.vector, torch.Tensor) else torch.as_tensor(req.vector)
        return vec.to(torch.float32).numpy().tobytes()

    def _prompt_state(self, prepared: PreparedPrompt) -> PromptState:
        # keyed by the weights in use too: the prompt's pass runs through every block, so a state of the base
        # model is wrong under an edit (selfie_core.weights), and one epoch's edit is wrong under the next
        key = (weights_key(self.model), prepared.input_ids, prepared.insert_positions)
        state = self._states.get(key)
        if state is None:
            with attention_kernels(self.input_device):
                state = prepare_prompt_state(self.model, prepared, self.input_device)
            self._states[key] = state
            while len(self._states) > 8:
                self._states.popitem(last=False)
        else:
            self._states.move_to_end(key)
        return state

    def _auto_batch_size(self, prompt_len: int, max_new_tokens: int) -> int:
        device = self.input_device
        if device.type != "cuda":
            return 256  # fewer sequential decode steps per row; the no-inject pass is chunked by logits size
        per_row = self._row_bytes(prompt_len + max_new_tokens)
        free = {}
        for name in per_row:
            dev = torch.device(name)
            if dev.type != "cuda":
                continue  # offloaded to host memory: not what limits a batch
            got, _ = torch.cuda.mem_get_info(dev)
            # memory torch's allocator holds but no tensor uses is free for us too (mem_get_info counts it as used)
            free[name] = got + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return rows_that_fit(free, {d: b for d, b in per_row.items() if d in free})

    def _row_bytes(self, tokens: int) -> dict[str, int]:
        """Bytes per batch row on each device the model computes on (``memory.row_bytes``)."""
        cfg = self.model.config
        layers: dict[str, int] = {}
        for i in range(self.num_layers):
            name = str(self.adapter.block_device(i))
            layers[name] = layers.get(name, 0) + 1
        output = self.model.get_output_embeddings()
        out_device = str(module_device(output)) if output is not None else str(self.input_device)
        heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 1)
        head_dim = getattr(cfg, "head_dim", None) or self.hidden_size // getattr(cfg, "num_attention_heads", 1)
        elem = torch.finfo(self.adapter.embeddings.weight.dtype).bits // 8
        return row_bytes(layers, out_device, kv_heads=heads, head_dim=head_dim, hidden_size=self.hidden_size,
                         vocab_size=int(getattr(cfg, "vocab_size", 32000)), tokens=tokens, elem_bytes=elem)
