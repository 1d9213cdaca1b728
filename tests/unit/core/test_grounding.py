"""Grounding: the baseline (the interpretation prompt's own output) and the judgement of each result."""

import pytest
import torch

from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest, SelfieEngine
from selfie_core.errors import SelfieInputError
from selfie_core.grounding import Baseline, GroundingConfig, is_repetition, judge, longest_repeat

PROMPT = "The Eiffel Tower is located in Paris, the capital of France."


@pytest.mark.parametrize("tokens, repeated", [
    ([5, 5, 5, 5], True),                        # "E E E E"
    ([9, 5, 5, 5, 5, 5], True),                  # "The Tower Tower Tower Tower Tower"
    ([1, 2, 1, 2, 1, 2, 1, 2, 3], True),         # a 2-token period, 8 of 9 tokens
    ([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4], True),  # a 4-token period
    ([0, 0] + [1, 2, 3, 4, 5, 6] * 5, True),      # "\n\nThe message is:\n\nThe message is: ..." (SmolLM2)
    (list(range(9)) * 3, False),                 # past 8 tokens a period is a phrase, not a loop
    ([1, 2, 3, 4, 5, 6, 7, 8, 8, 8], False),     # a repeat at the end of a sentence: 3 of 10 tokens
    ([1, 2, 1, 2], False),                       # twice is not a repetition
    ([], False),
])
def test_repetition(tokens, repeated):
    assert is_repetition(tokens) is repeated


def test_the_end_of_sequence_id_does_not_count():
    assert longest_repeat([7, 7, 7]) == (1, 3)
    assert is_repetition([7, 7, 7, 1, 2, 3, 4, 99], eos_ids=[99]) is False  # 3 of 7
    assert is_repetition([7, 7, 7, 1, 99], eos_ids=[99]) is True  # 3 of 4


def test_judge_gives_the_first_reason():
    base = Baseline("The message is about a tower.", (1, 2, 3))
    cfg = GroundingConfig(min_mean_relevancy=0.1)
    assert judge(" The message is about a tower. ", [1, 2, 3], 0.9, base, cfg) == "baseline"
    assert judge("Tower Tower Tower", [4, 4, 4], 0.9, base, cfg) == "repetition"
    assert judge("\n", [8], 0.9, base, cfg) == "empty"
    assert judge(" \"...\"", [8, 9], 0.9, base, cfg) == "empty"
    assert judge("Paris is a city", [5, 6, 7], 0.05, base, cfg) == "low_relevancy"
    assert judge("Paris is a city", [5, 6, 7], 0.1, base, cfg) is None
    assert judge("Paris is a city", [5, 6, 7], 0.0, base, GroundingConfig(0.0)) is None
    for bad in (-0.1, 1.5, "0.1", True, float("nan")):
        with pytest.raises(SelfieInputError):
            GroundingConfig(min_mean_relevancy=bad)
    with pytest.raises(SelfieInputError):
        GroundingConfig.from_dict({"min_relevancy": 0.1})


def test_the_baseline_is_the_prompts_own_greedy_output(engine, llama, tokenizer):
    template = InterpretationTemplate.preset("summarize", tokenizer)
    gen = GenerationConfig(max_new_tokens=8)
    baseline = engine.baseline(template, gen)
    prepared = template.prepare(tokenizer)
    with torch.no_grad():
        out = llama.generate(torch.tensor([prepared.input_ids]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = out[0, len(prepared.input_ids):].tolist()
    assert list(baseline.token_ids) == expected
    assert baseline.text == tokenizer.decode([t for t in expected if t != tokenizer.eos_token_id],
                                             skip_special_tokens=True)
    assert engine.baseline(template, gen) is baseline  # kept per template, settings and weights
    assert engine.baseline(template, GenerationConfig(max_new_tokens=4)) is not baseline
    sampled = GenerationConfig(max_new_tokens=8, do_sample=True, seed=3)
    assert engine.baseline(template, sampled) == SelfieEngine(llama, tokenizer).baseline(template, sampled)


def test_results_are_judged_against_the_baseline(engine, tokenizer):
    gen = GenerationConfig(max_new_tokens=8)
    n = len(tokenizer(PROMPT).input_ids)
    reqs = [InterpretRequest(PROMPT, layer, t) for layer in range(5) for t in range(n)]
    results = engine.interpret(reqs, generation=gen, injection=InjectionConfig(k=1), grounding={"min_mean_relevancy": 0})
    baseline = engine.baseline(None, gen)
    for r in results:
        expected = judge(r.text, r.token_ids, r.mean_relevancy, baseline, GroundingConfig(0.0), [tokenizer.eos_token_id])
        assert (r.grounded, r.ungrounded_reason) == (expected is None, expected)
        assert r.to_dict()["grounded"] is r.grounded
    strict = engine.interpret(reqs, generation=gen, grounding=GroundingConfig(min_mean_relevancy=1.0))
    assert all(not r.grounded for r in strict)
    assert {r.ungrounded_reason for r in strict} >= {"low_relevancy"}


def test_an_injection_that_changes_nothing_says_the_baseline(engine, tokenizer):
    # adding 0 x the state leaves the prompt as it is: every row is the baseline, and is judged so
    gen = GenerationConfig(max_new_tokens=8)
    reqs = [InterpretRequest(PROMPT, layer, 3) for layer in (1, 2, 3)]
    results = engine.interpret(reqs, generation=gen, injection=InjectionConfig(k=1, mode="add", strength=0.0))
    assert [r.text for r in results] == [engine.baseline(None, gen).text] * 3
    assert [(r.grounded, r.ungrounded_reason) for r in results] == [(False, "baseline")] * 3


def test_the_job_domain_states_the_engine_defaults():
    # selfie_jobs has no torch: it repeats these two numbers, and they must stay the engine's
    from selfie_core import grounding, templates
    from selfie_jobs import specs

    assert specs.DEFAULT_MIN_MEAN_RELEVANCY == grounding.DEFAULT_MIN_MEAN_RELEVANCY
    assert specs.MAX_SYSTEM_CHARS == templates.MAX_SYSTEM_CHARS


def test_the_baseline_rides_along_in_the_first_batch(llama, tokenizer):
    # computed in-band (one row more, nothing injected into it) it is the one a generation of its own gives
    gen = GenerationConfig(max_new_tokens=8)
    reqs = [InterpretRequest(PROMPT, layer, 2) for layer in (0, 2, 4)]
    inband = SelfieEngine(llama, tokenizer)
    inband.interpret(reqs, generation=gen)
    assert len(inband._baselines) == 1
    assert inband.baseline(None, gen) == SelfieEngine(llama, tokenizer).baseline(None, gen)
    sampled = GenerationConfig(max_new_tokens=8, do_sample=True, seed=5)
    inband.interpret(reqs, generation=sampled)
    assert inband.baseline(None, sampled) == SelfieEngine(llama, tokenizer).baseline(None, sampled)


def test_plain_rows_get_nothing_injected():
    from selfie_core.hooks import apply_injection

    h = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    v = torch.full((2, 4), 9.0)
    out = apply_injection(h, [1], v, "replace", 1.0, plain_rows=[1])
    assert torch.equal(out[0, 1], v[0]) and torch.equal(out[1], h[1])
