"""An edit's evaluations, on the base model and on the variant, in the shape the variant's `evaluations` JSON
holds (docs/architecture.md): the objective (supervised: the source state's distance to its target; reinforce:
the share of the prompt's states whose interpretation the judge rejects), the SelfIE interpretation of the source
state, the greedy answer to the source prompt, and when asked knowledge preservation and harmful behaviour.
Every figure is computed with the edit swapped in or not; the resident weights never change.

`between()` runs between two steps (each figure, and each slice of `EVAL_SLICE` facts or behaviour requests, the
batch `selfie_core.textgen.generate` runs anyway): the runner's cancel check and other work of the model, so a
long evaluation is as interruptible as training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from workers.runners.edits import ANSWER_TOKENS

#: Facts or behaviour requests generated per step (the batch size `selfie_core.textgen.generate` uses).
EVAL_SLICE = 64


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate(engine: Any, run: Any, spec: dict[str, Any], template: Any,
             between: Callable[[], None] = lambda: None) -> dict[str, Any]:
    from selfie_core.edit_evals import interpret_state, source_distance

    edit = run.edit
    k, max_new = spec["injection"]["k"], spec["generation"]["max_new_tokens"]
    out: dict[str, Any] = {}
    if spec["method"] == "supervised":
        prompt, layer, token = spec["source"]["prompt"], spec["source"]["layer"], spec["source"]["token"]
        target = run.target.float().cpu()
        out["objective"] = {"name": "source_distance",
                            "base": _finite(source_distance(engine, prompt, layer, token, target)),
                            "variant": _finite(source_distance(engine, prompt, layer, token, target, edit))}
        t = spec.get("target")
        between()
        target_text = (interpret_state(engine, t["prompt"], t["layer"], t["token"], template=template, k=k,
                                       max_new_tokens=max_new) if t else None)
    else:
        prompt, layer = spec["prompt"], spec["layer"]
        token = len(engine.tokenizer(prompt).input_ids) - 1
        first = run.history[0].bad_share if run.history else None
        out["objective"] = {"name": "bad_share", "base": first, "variant": _bad_share(run)}
        target_text = None
    between()
    base = interpret_state(engine, prompt, layer, token, template=template, k=k, max_new_tokens=max_new)
    between()
    variant = interpret_state(engine, prompt, layer, token, edit, template=template, k=k, max_new_tokens=max_new)
    out["interpretation"] = {"prompt": prompt, "layer": layer, "token": token, "base": base, "variant": variant,
                             "target": target_text}
    between()
    out["answer"] = _answer(engine, prompt, edit)
    asked = spec.get("evaluations") or {}
    if "knowledge" in asked:
        out["knowledge"] = _knowledge(engine, asked["knowledge"], edit, between)
    if "behaviour" in asked:
        out["behaviour"] = _behaviour(engine, asked["behaviour"], edit, between)
    return out


def _sliced(items: Sequence[Any], between: Callable[[], None], step: Callable[[Sequence[Any]], Any]) -> list[Any]:
    """`step` over `items` in slices of `EVAL_SLICE`, `between()` before each."""
    out = []
    for start in range(0, len(items), EVAL_SLICE):
        between()
        out.append(step(items[start : start + EVAL_SLICE]))
    return out


def _bad_share(run: Any) -> float | None:
    """The share of the prompt's states the judge rejects with the trained edit (one more pass, no step)."""
    import torch

    from selfie_core.edits import mlp_output

    with torch.no_grad():
        texts = run.interpret(mlp_output(run.edit, run.states))
    many = getattr(run.judge, "many", None)
    rewards = many(texts) if many is not None else [run.judge(t) for t in texts]
    return sum(r == -1 for r in rewards) / len(rewards) if rewards else None


def _answer(engine: Any, prompt: str, edit: Any) -> dict[str, Any]:
    """The greedy answer to the source prompt as a `generate` job gives it (one chat turn, no system prompt; the raw
    text on a model without a chat template), so that `selfie generate PROMPT --max-new-tokens 50 [--variant ID]`
    reproduces both answers."""
    from workers.runners.generate import generate_texts

    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    base, variant = (generate_texts(engine, [prompt], chat=chat, max_new_tokens=ANSWER_TOKENS, edit=which)[0].text
                     for which in (None, edit))
    return {"prompt": prompt, "chat": chat, "max_new_tokens": ANSWER_TOKENS, "base": base, "variant": variant}


def _knowledge(engine: Any, asked: dict[str, Any], edit: Any, between: Callable[[], None]) -> dict[str, Any]:
    from selfie_core.edit_evals import Fact, KnowledgePreservation, KnowledgeResult, knowledge, load_facts

    facts = load_facts() if asked.get("facts") is None else [Fact(f["prompt"], f["attribute"]) for f in asked["facts"]]

    def measured(which: Any) -> KnowledgeResult:
        parts = _sliced(facts, between, lambda part: knowledge(engine.model, engine.tokenizer, part, which))
        return KnowledgeResult([r for p in parts for r in p.responses], [c for p in parts for c in p.correct])

    result = KnowledgePreservation(measured(None), measured(edit))
    figures = result.to_dict()
    return {"facts": figures["facts"], "known": figures["known"], "kept_of_known": figures["kept_of_known"],
            "base_accuracy": figures["base_accuracy"], "edited_accuracy": figures["edited_accuracy"],
            "known_facts": [facts[i].prompt for i in result.known]}


def _behaviour(engine: Any, asked: dict[str, Any], edit: Any, between: Callable[[], None]) -> dict[str, Any]:
    from selfie_core.edit_evals import BehaviourResult, harmful_behaviour
    from selfie_jobs.audit_detectors import build

    detector = build(asked["detector"])
    figures = {}
    for label, which in (("base", None), ("variant", edit)):
        parts = _sliced(asked["requests"], between,
                        lambda part: harmful_behaviour(engine.model, engine.tokenizer, part, detector, edit=which,
                                                       max_new_tokens=asked["max_new_tokens"]))
        result = BehaviourResult(*([x for p in parts for x in getattr(p, name)] for name in
                                   ("requests", "plain", "injected", "plain_hits", "injected_hits"))).to_dict()
        figures[label] = {"plain_hit_rate": result["plain_hit_rate"], "injected_hit_rate": result["injected_hit_rate"]}
    return {"requests": len(asked["requests"]), "detector": detector.name, **figures}
