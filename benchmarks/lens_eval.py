"""Lenses against SelfIE on SmolLM2-135M-Instruct (CPU): what each reading of a hidden state gets right, per layer.

Pairs: ``--pairs`` (prompt, position) pairs drawn with ``--seed`` from every position of the built-in prompt sets
(``selfie_jobs/prompt_sets``, the raw prompt texts) whose token is a whole content word (``word_at``) and is not the
prompt's last token. For each pair and each layer ``0..num_layers`` of ``hidden_states``:

- precision@1 of the logit lens and of the identity patch (``selfie_core.lenses.run_lenses``): the share of pairs
  whose top-1 token is the model's own next-token prediction there (the argmax of its logits at that position);
- the share whose top-1 token is the source token itself (the lens "echoes" its input rather than predicting);

and for SelfIE (``SelfieEngine.interpret``, the default ``summarize`` preset (no system turn), k=1, greedy,
``--max-new-tokens``) at every ``--selfie-step``-th layer (and the last): the naming rate, the share of pairs whose
interpretation names the source token's word (``names``: the word, case-insensitive, not preceded or followed by
a letter; no stemming). The control: the same interpretation prompt with nothing injected (``add`` with strength 0)
names the pair's word at the baseline rate.

Results are kept in a cache file (``--cache``) after every batch, so a run that is stopped resumes where it was.
Writes the numbers as JSON (``--out``) and the curves as an SVG (``--svg``), drawn here without a plotting library.

    .venv/bin/python benchmarks/lens_eval.py                # SmolLM2; about 25 min on the shared 2-core machine
    .venv/bin/python benchmarks/lens_eval.py --tiny         # a tiny random LLaMA, seconds: checks the script
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfie_core import (GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest,  # noqa: E402
                         SelfieEngine, load_model)
from selfie_core.lenses import IDENTITY_PROMPT, LensRequest, _patched_last_position, run_lenses  # noqa: E402
from selfie_core.modelcall import attention_kernels, forward  # noqa: E402
from selfie_jobs.prompt_sets import BUILTIN, builtin_path, iter_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
#: Frequent English function words: almost any text names them, so naming one would say little about the state.
#: (Kept short: the built-in sets hold 321 qualifying positions with this list, and the evaluation needs 300.)
STOPWORDS = frozenset("the and you your are this that with for from what how why who which was were have has had not "
                      "but its they their them his her our can will all".split())
LETTERS = re.compile(r"[A-Za-z]+")


def builtin_prompts() -> list[tuple[str, str]]:
    """(set name, prompt) for every prompt of the built-in sets, in file order."""
    out = []
    for name in sorted(BUILTIN):
        with builtin_path(name).open("rb") as fh:
            out.extend((name, row.text) for row in iter_jsonl(fh))
    return out


def word_at(pieces: list[str], t: int) -> str | None:
    """The word that token ``t`` (decoded ``pieces``) spells when it is a whole content word of the text, else None.

    Whole: the piece is letters only, after at most one leading space; it starts a word (position 0, a leading
    space, or a previous piece that does not end in a letter) and the word does not go on (the next piece, when
    there is one, does not start with a letter). Content: at least 3 letters and not in ``STOPWORDS``."""
    piece = pieces[t]
    word = piece[1:] if piece.startswith(" ") else piece
    if not LETTERS.fullmatch(word) or len(word) < 3 or word.lower() in STOPWORDS:
        return None
    starts = t == 0 or piece.startswith(" ") or not pieces[t - 1][-1:].isalpha()
    ends = t + 1 == len(pieces) or not pieces[t + 1][:1].isalpha()
    return word if starts and ends else None


def names(text: str, word: str) -> bool:
    """Whether ``text`` names ``word``: the word, case-insensitive, with no letter right before or after it."""
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, re.IGNORECASE) is not None


def pick_pairs(tokenizer, prompts: list[tuple[str, str]], count: int, seed: int) -> list[dict]:
    """``count`` pairs drawn with ``seed`` from every (prompt, position) whose token is a whole content word and
    not the prompt's last token (so that the model's next-token prediction there is about a token of the prompt)."""
    candidates = []
    for index, (set_name, prompt) in enumerate(prompts):
        ids = list(tokenizer(prompt).input_ids)
        pieces = [tokenizer.decode([i]) for i in ids]
        for t in range(len(ids) - 1):
            word = word_at(pieces, t)
            if word is not None:
                candidates.append({"set": set_name, "prompt_index": index, "prompt": prompt, "token": t,
                                   "token_id": ids[t], "word": word})
    if len(candidates) < count:
        raise SystemExit(f"only {len(candidates)} (prompt, position) pairs qualify; ask for at most that many")
    chosen = random.Random(seed).sample(range(len(candidates)), count)
    return [candidates[i] for i in sorted(chosen)]


class Cache:
    """Results by key in a JSON file, written after every batch; a file made with other settings is set aside."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = settings
        self.data: dict = {"settings": settings, "lenses": {}, "selfie": {}, "baseline": None}
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("settings") == settings:
                self.data = stored
            else:
                print(f"{path} holds results of other settings: starting afresh", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def identity_top1(engine, prefix_cache, identity_ids: list[int], states: torch.Tensor, layers: list[int]) -> list[int]:
    """The identity patch's top-1 token for each row: ``selfie_core.lenses.identity_logits`` with the identity
    prompt's prefix (every token but the last) run once and its cache shared by the rows. The patch writes only the
    last position, which no earlier position attends to, so the prefix is the same for every row; computing it
    once makes the lens ~20x cheaper on SmolLM2 (20 of its 21 identity-prompt positions), which decides whether
    this evaluation fits a shared CPU. ``check_identity_path`` compares it with ``run_lenses`` in every run."""
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(len(layers))
    last = torch.full((len(layers), 1), identity_ids[-1], device=engine.input_device)
    with _patched_last_position(engine.model, layers, states):
        logits, _, _ = forward(engine.model, last, cache=cache, use_cache=True)
    return logits[:, -1].argmax(-1).tolist()


def identity_prefix(engine) -> tuple[list[int], object]:
    ids = list(engine.tokenizer(IDENTITY_PROMPT).input_ids)
    _, cache, _ = forward(engine.model, torch.tensor([ids[:-1]], device=engine.input_device), use_cache=True)
    return ids, cache


@torch.inference_mode()
def run_lens_part(engine, pairs, layers, cache: Cache, batch_pairs: int) -> None:
    """Per chunk of ``batch_pairs`` pairs x every layer: the logit lens and the model's own prediction from
    ``run_lenses``, the identity patch from ``identity_top1`` over the same states."""
    done = cache.data["lenses"]
    identity_ids, prefix = identity_prefix(engine)
    todo = [i for i in range(len(pairs)) if any(f"{i}:{layer}" not in done for layer in layers)]
    start, count = time.perf_counter(), 0
    for at in range(0, len(todo), batch_pairs):
        chunk = todo[at : at + batch_pairs]
        requests = [LensRequest(pairs[i]["prompt"], layer, pairs[i]["token"], key=f"{i}:{layer}")
                    for i in chunk for layer in layers]
        readings = [r for batch in run_lenses(engine, requests, lenses=["logit"], top_k=1) for r in batch]
        wanted: dict[str, set] = {}
        for req in requests:
            wanted.setdefault(req.prompt, set()).add((req.layer, req.token))
        states = engine.hidden_states({prompt: sorted(got) for prompt, got in wanted.items()})
        read = torch.stack([states[r.prompt][(r.layer, r.token)] for r in requests]).to(engine.input_device)
        with attention_kernels(engine.input_device):
            identity = identity_top1(engine, prefix, identity_ids, read, [r.layer for r in requests])
        for r, top in zip(readings, identity):
            source = pairs[int(r.key.split(":")[0])]["token_id"]
            done[r.key] = {"model": r.model.token_ids[0], "logit": r.logit.token_ids[0], "identity": top,
                           "source": source}
        cache.save()
        count += len(requests)
        print(f"lenses: {len(done)}/{len(pairs) * len(layers)} readings "
              f"({count / (time.perf_counter() - start):.1f}/s)", flush=True)


def check_identity_path(engine, pairs, layers, cache: Cache, count: int) -> dict:
    """``run_lenses``'s identity patch (the full identity prompt per row) on the first ``count`` pairs at every
    layer, against the top-1 tokens this evaluation stored for them."""
    requests = [LensRequest(p["prompt"], layer, p["token"], key=f"{i}:{layer}")
                for i, p in enumerate(pairs[:count]) for layer in layers]
    same = sum(r.identity.token_ids[0] == cache.data["lenses"][r.key]["identity"]
               for batch in run_lenses(engine, requests, lenses=["identity"], top_k=1) for r in batch)
    return {"readings": len(requests), "same_top1": same}


def run_selfie_part(engine, pairs, layers, template, generation, cache: Cache, batch_size: int | None) -> None:
    done = cache.data["selfie"]
    if cache.data["baseline"] is None:
        # nothing injected: the prompt's own hidden state plus 0 times the source state
        first = pairs[0]
        plain = engine.interpret([InterpretRequest(first["prompt"], 0, first["token"])], template,
                                 InjectionConfig(mode="add", strength=0.0), generation)
        cache.data["baseline"] = plain[0].text
        cache.save()
    todo = [InterpretRequest(p["prompt"], layer, p["token"], key=f"{i}:{layer}")
            for i, p in enumerate(pairs) for layer in layers if f"{i}:{layer}" not in done]
    start, count = time.perf_counter(), 0
    for batch in engine.stream(todo, template, InjectionConfig(), generation, batch_size):
        for r in batch:
            done[r.key] = r.text
        cache.save()
        count += len(batch)
        print(f"SelfIE: {len(done)}/{len(pairs) * len(layers)} interpretations "
              f"({count / (time.perf_counter() - start):.2f}/s)", flush=True)


def summarize(pairs, lens_layers, selfie_layers, cache: Cache) -> list[dict]:
    lenses, selfie = cache.data["lenses"], cache.data["selfie"]
    n = len(pairs)
    rows = []
    for layer in lens_layers:
        got = [lenses[f"{i}:{layer}"] for i in range(n)]
        logit_right = [g["logit"] == g["model"] for g in got]
        identity_right = [g["identity"] == g["model"] for g in got]
        row = {
            "layer": layer,
            "logit_precision_at_1": sum(logit_right) / n,
            "identity_precision_at_1": sum(identity_right) / n,
            # discordant pairs: the counts a sign test of "identity beats logit" at this layer looks at
            "identity_right_logit_wrong": sum(i and not g for i, g in zip(identity_right, logit_right)),
            "logit_right_identity_wrong": sum(g and not i for i, g in zip(identity_right, logit_right)),
            "logit_top1_is_source": sum(g["logit"] == g["source"] for g in got) / n,
            "identity_top1_is_source": sum(g["identity"] == g["source"] for g in got) / n,
            "selfie_naming_rate": None,
        }
        if layer in selfie_layers:
            row["selfie_naming_rate"] = sum(names(selfie[f"{i}:{layer}"], p["word"]) for i, p in enumerate(pairs)) / n
        rows.append(row)
    return rows


# -- the plot ------------------------------------------------------------------------------------------------------
SERIES = (("logit_precision_at_1", "logit lens: precision@1 (next token)", "#1f77b4"),
          ("identity_precision_at_1", "identity patch: precision@1 (next token)", "#d62728"),
          ("selfie_naming_rate", "SelfIE: names the source word", "#2ca02c"))


def svg_plot(rows: list[dict], baseline_rate: float, title: str) -> str:
    width, height = 900, 440
    left, right, top, bottom = 60, 300, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    last = rows[-1]["layer"]

    def x(layer: float) -> float:
        return left + plot_w * layer / max(last, 1)

    def y(value: float) -> float:
        return top + plot_h * (1 - value)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left + plot_w / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for tick in range(0, 101, 20):
        v = tick / 100
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + plot_w}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{tick}%</text>')
    step = 1 if last <= 10 else 3
    for layer in range(0, last + 1, step):
        out.append(f'<line x1="{x(layer):.1f}" y1="{top + plot_h}" x2="{x(layer):.1f}" y2="{top + plot_h + 5}" '
                   'stroke="black"/>')
        out.append(f'<text x="{x(layer):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{layer}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">layer of hidden_states</text>')
    out.append(f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               'share of pairs</text>')
    out.append(f'<line x1="{left}" y1="{y(baseline_rate):.1f}" x2="{left + plot_w}" y2="{y(baseline_rate):.1f}" '
               'stroke="#2ca02c" stroke-dasharray="5 4"/>')
    for key, _, color in SERIES:
        points = [(x(r["layer"]), y(r[key])) for r in rows if r[key] is not None]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>' for px, py in points)
    legend_x = left + plot_w + 20
    for i, (_, label, color) in enumerate(SERIES):
        ly = top + 10 + 22 * i
        out.append(f'<line x1="{legend_x}" y1="{ly}" x2="{legend_x + 24}" y2="{ly}" stroke="{color}" '
                   'stroke-width="2"/>')
        out.append(f'<circle cx="{legend_x + 12}" cy="{ly}" r="3" fill="{color}"/>')
        out.append(f'<text x="{legend_x + 32}" y="{ly + 4}">{escape(label)}</text>')
    ly = top + 10 + 22 * len(SERIES)
    out.append(f'<line x1="{legend_x}" y1="{ly}" x2="{legend_x + 24}" y2="{ly}" stroke="#2ca02c" '
               'stroke-dasharray="5 4"/>')
    out.append(f'<text x="{legend_x + 32}" y="{ly + 4}">SelfIE, nothing injected: names it</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- the tiny model ------------------------------------------------------------------------------------------------
def tiny_model(prompts: list[tuple[str, str]]):
    """A random 4-layer LLaMA and a byte-level BPE tokenizer trained on the prompts (no download, seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p for _, p in prompts], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False), tokenizer


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random LLaMA instead of SmolLM2 (checks the script)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=None, help="(prompt, position) pairs (default 300; --tiny 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--selfie-step", type=int, default=3, help="SelfIE at layers 0, step, 2*step, ... and the last")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--lens-batch", type=int, default=4, help="pairs per lens batch (times every layer)")
    ap.add_argument("--check-pairs", type=int, default=2,
                    help="pairs whose identity patch is computed again by run_lenses, to check the cached path")
    ap.add_argument("--selfie-batch", type=int, default=None, help="engine batch size (default: the engine's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="the numbers (default benchmarks/figures/lens_eval.json)")
    ap.add_argument("--svg", type=Path, default=None, help="the plot (default benchmarks/figures/lens_eval.svg)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="results so far (default ~/.cache/selfie/lens_eval/<model>.json)")
    args = ap.parse_args(argv)
    figures = Path(tempfile.gettempdir()) / "lens_eval_tiny" if args.tiny else HERE / "figures"
    name = "tiny-llama" if args.tiny else args.model
    args.pairs = args.pairs or (12 if args.tiny else 300)
    args.out = args.out or figures / "lens_eval.json"
    args.svg = args.svg or figures / "lens_eval.svg"
    args.cache = args.cache or Path.home() / ".cache" / "selfie" / "lens_eval" / f"{name}.json"
    args.name = name
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = builtin_prompts()
    if args.tiny:
        model, tokenizer = tiny_model(prompts)
        engine = SelfieEngine(model, tokenizer, name=args.name)
    else:
        engine = SelfieEngine(load_model(args.model))
    tokenizer = engine.tokenizer
    last = engine.num_layers
    lens_layers = list(range(last + 1))
    selfie_layers = sorted(set(range(0, last + 1, args.selfie_step)) | {last})
    template = InterpretationTemplate.preset("summarize", tokenizer)  # the service's default interpretation prompt
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    pairs = pick_pairs(tokenizer, prompts, args.pairs, args.seed)
    settings = {"model": args.name, "pairs": args.pairs, "seed": args.seed, "selfie_layers": selfie_layers,
                "template": template.text_with_placeholders, "generation": generation.to_dict(),
                "pairs_digest": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()}
    cache = Cache(args.cache, settings)
    started = time.perf_counter()
    run_lens_part(engine, pairs, lens_layers, cache, args.lens_batch)
    check = check_identity_path(engine, pairs, lens_layers, cache, args.check_pairs)
    print(f"identity patch, run_lenses against the cached prefix: {check['same_top1']}/{check['readings']} "
          "top-1 tokens the same", flush=True)
    run_selfie_part(engine, pairs, selfie_layers, template, generation, cache, args.selfie_batch)
    rows = summarize(pairs, lens_layers, selfie_layers, cache)
    baseline = cache.data["baseline"]
    baseline_rate = sum(names(baseline, p["word"]) for p in pairs) / len(pairs)
    early = [r for r in rows if r["layer"] < last // 3 or r["layer"] == 0]
    result = {
        "model": args.name,
        "num_layers": last,
        "pairs": len(pairs),
        "seed": args.seed,
        "prompt_sets": sorted(BUILTIN),
        "selfie": {"layers": selfie_layers, "template": template.text_with_placeholders, "k": InjectionConfig().k,
                   "generation": generation.to_dict(), "baseline_text": baseline,
                   "baseline_naming_rate": baseline_rate},
        "layers": rows,
        "identity_path_check": check,
        "identity_beats_logit_at_layers": [r["layer"] for r in rows
                                           if r["identity_precision_at_1"] > r["logit_precision_at_1"]],
        "early_layers_identity_minus_logit": sum(r["identity_precision_at_1"] - r["logit_precision_at_1"]
                                                 for r in early) / len(early),
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "pair_list": [{k: p[k] for k in ("set", "prompt_index", "token", "word")} for p in pairs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    title = f"{args.name}: lenses and SelfIE per layer ({len(pairs)} pairs of the built-in prompt sets)"
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    args.svg.write_text(svg_plot(rows, baseline_rate, title))
    print_table(result)
    print(f"wrote {args.out} and {args.svg}")
    return result


def print_table(result: dict) -> None:
    print(f"{result['model']}, {result['pairs']} pairs; SelfIE nothing injected names the word: "
          f"{100 * result['selfie']['baseline_naming_rate']:.1f}% (baseline {result['selfie']['baseline_text']!r})")
    print("| layer | logit lens p@1 | identity patch p@1 | identity right, logit wrong / reverse "
          "| logit top-1 = source | identity top-1 = source | SelfIE names the word |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["layers"]:
        selfie = "" if r["selfie_naming_rate"] is None else f"{100 * r['selfie_naming_rate']:.1f}%"
        print(f"| {r['layer']} | {100 * r['logit_precision_at_1']:.1f}% | {100 * r['identity_precision_at_1']:.1f}% "
              f"| {r['identity_right_logit_wrong']} / {r['logit_right_identity_wrong']} "
              f"| {100 * r['logit_top1_is_source']:.1f}% | {100 * r['identity_top1_is_source']:.1f}% | {selfie} |")


if __name__ == "__main__":
    main()
