"""The data behind the grounding defaults (docs/grounding.md) and the system-prompt leak count, on SmolLM2.

Interprets a few prompts over layers x tokens with the default `summarize` preset (no system turn), k=1 and 30 new
tokens, and prints:
- how many interpretations speak of the model itself ("SmolLM", "helpful AI", "Hugging Face") with the preset
  rendered without a system turn and with the chat template's own default system prompt;
- for the default rendering, each result's mean relevancy and how `selfie_core.grounding` judges it apart from
  the threshold (baseline, repetition, empty), and the distribution of mean relevancy of the rest in two groups:
  "on topic" (the text names a word of its source prompt: `on_topic`) and "off topic" (the prompt's own
  free-running story: "The new employee, who was hired last week, ..."), with the threshold that separates them
  best (largest true-on-topic rate minus false-on-topic rate).

    .venv/bin/python benchmarks/grounding_data.py [--layers 0:31:3] [--tokens -6:] [--json out.json]
    .venv/bin/python benchmarks/grounding_data.py --from-json out.json     # the analysis again, no model run
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

LEAK = re.compile(r"SmolLM|helpful AI|Hugging ?Face", re.IGNORECASE)
PROMPTS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Water is made of hydrogen and oxygen.",
    "The quick brown fox jumps over the lazy dog.",
    "You find a wallet with cash and an ID card on the sidewalk.",
]


# words of the prompts that say nothing about their topic (or are the template's own)
STOP = {"the", "and", "with", "over", "made", "find", "located", "you", "is", "of", "an", "on", "a"}


def on_topic(text: str, prompt: str) -> bool:
    """The text names a word of its source prompt (3 letters or more, matched on its first 5 letters)."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]{3,}", prompt)} - STOP
    return any(re.search(r"\b" + re.escape(w[:5]), text, re.IGNORECASE) for w in words)


def analyse(rows: list[dict]) -> float:
    """Print the groups' distributions and return the separating threshold."""
    scored = [r for r in rows if r["kind"] == "other"]
    on = sorted(r["mean_relevancy"] for r in scored if on_topic(r["text"], r["prompt"]))
    off = sorted(r["mean_relevancy"] for r in scored if not on_topic(r["text"], r["prompt"]))
    for kind in ("baseline", "repetition", "empty"):
        print(f"{kind:>10}: {sum(r['kind'] == kind for r in rows)} of {len(rows)}")
    for name, values in (("on topic", on), ("off topic", off)):
        q = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
        print(f"{name:>10}: n={len(values):4d}  mean relevancy deciles " + " ".join(f"{v:.3f}" for v in q))
    best = (-1.0, 0.0)
    for step in range(1, 41):
        t = step * 0.005
        j = sum(v >= t for v in on) / max(1, len(on)) - sum(v >= t for v in off) / max(1, len(off))
        print(f"  threshold {t:.3f}: on topic kept {sum(v >= t for v in on) / max(1, len(on)):.2f}, "
              f"off topic kept {sum(v >= t for v in off) / max(1, len(off)):.2f}, J={j:.3f}")
        best = max(best, (j, t))
    print(f"best separating threshold: {best[1]:.3f} (J={best[0]:.3f})")
    return best[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="0:31:3")
    parser.add_argument("--tokens", default="-6:")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--from-json", default=None, help="analyse the rows a --json run wrote, without the model")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as fh:
            saved = json.load(fh)
        print({k: v for k, v in saved.items() if k not in ("rows", "baseline")})
        print(f"baseline: {saved['baseline']!r}")
        analyse(saved["rows"])
        return

    import torch

    from selfie_core import GenerationConfig, InterpretationTemplate, InterpretRequest, SelfieEngine, load_model
    from selfie_core.grounding import GroundingConfig, is_repetition
    from selfie_jobs.selectors import parse_selector
    from selfie_jobs.specs import IndexRange, resolve_selector

    torch.set_num_threads(args.threads)
    engine = SelfieEngine(load_model("smollm2-135m-instruct"))
    tok = engine.tokenizer

    def pick(text, length):
        value = parse_selector(text)
        return resolve_selector(IndexRange(**value) if isinstance(value, dict) else value, length, "index")

    requests = []
    for prompt in PROMPTS:
        n = len(tok(prompt).input_ids)
        requests += [InterpretRequest(prompt, layer, t) for layer in pick(args.layers, engine.num_layers + 1)
                     for t in pick(args.tokens, n)]
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    off = GroundingConfig(min_mean_relevancy=0.0)
    templates = {"no system turn (default)": InterpretationTemplate.preset("summarize", tok),
                 "the template's own system prompt": InterpretationTemplate.preset("summarize", tok,
                                                                                 tokenizer_default_system=True)}
    out: dict = {"requests": len(requests)}
    for label, template in templates.items():
        started = time.perf_counter()
        results = engine.interpret(requests, template=template, generation=generation, grounding=off)
        leaks = [r for r in results if LEAK.search(r.text)]
        print(f"{label}: {len(leaks)}/{len(results)} interpretations speak of the model itself "
              f"({time.perf_counter() - started:.0f}s)")
        out[label] = {"leaks": len(leaks), "total": len(results)}
        if label.startswith("no system"):
            baseline = engine.baseline(template, generation)
            print(f"baseline: {baseline.text!r}")
            rows = []
            for r in results:
                kind = ("baseline" if r.text.strip() == baseline.text.strip()
                        else "repetition" if is_repetition(r.token_ids, [tok.eos_token_id])
                        else "empty" if not any(ch.isalnum() for ch in r.text) else "other")
                rows.append({"prompt": r.prompt, "layer": r.layer, "token": r.token, "source": r.source_token,
                             "text": r.text, "token_ids": r.token_ids, "mean_relevancy": r.mean_relevancy,
                             "kind": kind})
            out["rows"] = rows
            out["baseline"] = baseline.text
            analyse(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
