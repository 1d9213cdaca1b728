"""CPU threads benchmark: the engine's throughput on SmolLM2-135M-Instruct with torch's default thread count (one
per core: the naive reference), with `selfie_core.threads.default_threads()` (what `selfie worker` and
`selfie interpret` use unless `--threads` says otherwise) and with each count given by --threads, in one run.

    python benchmarks/threads_bench.py                      # default rule, 1 and 2 threads, torch's default
    python benchmarks/threads_bench.py --threads 1,2,4 --rounds 5

Rounds alternate the settings (the machine may be shared) and each setting reports its median; the load average
is printed with the results, since it decides them.
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
from selfie_core.threads import default_threads, usable_cores  # noqa: E402

PROMPT = "The Eiffel Tower is located in Paris, the capital of France."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts to time besides the two defaults")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", default="0,6,12,18,24,30")
    ap.add_argument("--tokens", type=int, default=4, help="the prompt's last N tokens")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args()

    torch_default = torch.get_num_threads()  # before anything sets it: one per core
    settings = {f"torch default ({torch_default})": torch_default, f"rule ({default_threads()})": default_threads()}
    settings.update({f"{n} thread{'s' * (n > 1)}": n for n in map(int, args.threads.split(","))})
    lm = load_model("smollm2-135m-instruct")
    engine = SelfieEngine(lm.model, lm.tokenizer, name="smollm2")
    n = len(lm.tokenizer(PROMPT).input_ids)
    requests = [InterpretRequest(PROMPT, layer, t) for layer in map(int, args.layers.split(","))
                for t in range(n - args.tokens, n)]
    template = InterpretationTemplate.preset("summarize", lm.tokenizer)
    injection, generation = InjectionConfig(k=2), GenerationConfig(max_new_tokens=args.max_new_tokens)
    print(f"usable cores: {usable_cores()}; workload: {len(requests)} interpretations, "
          f"{args.max_new_tokens} new tokens; load average before: {os.getloadavg()[0]:.1f}")
    engine.interpret(requests[:2], template, injection, generation)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, threads in settings.items():
            torch.set_num_threads(threads)
            engine._states.clear()  # the shared prompt pass counts in every round
            started = time.perf_counter()
            engine.interpret(requests, template, injection, generation)
            times[name].append(time.perf_counter() - started)
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    reference = statistics.median(times[next(iter(settings))])
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"{'setting':<22} {'median s':>9} {'interp/s':>9} {'vs torch default':>17}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<22} {median:>9.1f} {len(requests) / median:>9.2f} {reference / median:>16.2f}x")


if __name__ == "__main__":
    main()
