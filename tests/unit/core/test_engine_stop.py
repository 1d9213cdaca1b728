"""`SelfieEngine.stream(should_stop=, on_step=)`: stopped requests leave between decode steps and before their
batch, with no result; the others are computed exactly as without the callback; progress is told per step."""

from __future__ import annotations

from selfie_core import GenerationConfig
from tests.unit.core.test_engine import assert_same, requests_for

GEN = GenerationConfig(max_new_tokens=24, eos_token_ids=())  # no end-of-sequence token: no row ends early,: every step is decoded


def test_rows_stopped_while_decoding_leave_at_once_and_the_others_are_unchanged(engine, tokenizer):
    reqs = requests_for(tokenizer)[:12]
    doomed = {r.key for r in reqs[::3]}
    plain = engine.interpret(reqs, generation=GEN, batch_size=12)
    asked: list[tuple[int, int, int]] = []

    def should_stop(keys):
        # the rows of a "cancelled job", from the fifth decode step on
        return doomed & set(keys) if len(asked) >= 4 else ()

    out = [r for b in engine.stream(reqs, generation=GEN, batch_size=12, should_stop=should_stop,
                                    on_step=lambda step, steps, rows: asked.append((step, steps, rows)))
           for r in b]
    assert {r.key for r in out} == {r.key for r in reqs} - doomed
    assert_same(out, [r for r in plain if r.key not in doomed])
    assert asked[0] == (1, 24, 12) and asked[4][2] == 12 - len(doomed)  # the stopped rows left after step 4
    assert [s for s, _, _ in asked] == list(range(1, 24))


def test_a_batch_whose_rows_all_stop_ends_within_one_step(engine, tokenizer):
    reqs = requests_for(tokenizer)[:6]
    steps = []
    out = list(engine.stream(reqs, generation=GEN, batch_size=6,
                             should_stop=lambda keys: set(keys) if steps else (),
                             on_step=lambda step, n, rows: steps.append(step)))
    assert out == [[]] and steps == [1]  # told at the first step, no second step ran


def test_requests_stopped_before_their_batch_are_not_run(engine, tokenizer):
    reqs = requests_for(tokenizer)[:10]
    seen = []

    def should_stop(keys):
        seen.append(len(keys))
        return {r.key for r in reqs[5:]} & set(keys)

    batches = list(engine.stream(reqs, generation=GEN, batch_size=5, should_stop=should_stop))
    assert [len(b) for b in batches] == [5]  # the second batch was dropped whole before it ran
    assert seen[0] == 5 and seen[-1] == 5
    assert_same(batches[0], engine.interpret(reqs[:5], generation=GEN, batch_size=5))


def test_requests_stopped_while_their_states_are_extracted_are_not_decoded(engine, tokenizer):
    """A cancel that comes during the batch's extraction (seconds for a large batch on a CPU) is seen before the
    first decode step: the batch does not start decoding."""
    reqs = requests_for(tokenizer)[:6]
    asked, steps = [], []

    def should_stop(keys):
        asked.append(len(keys))
        return set(keys) if len(asked) >= 2 else ()  # nothing before the extraction, everything after it

    out = list(engine.stream(reqs, generation=GEN, batch_size=6, should_stop=should_stop,
                             on_step=lambda step, n, rows: steps.append(step)))
    assert out == [] and steps == [] and asked == [6, 6]
