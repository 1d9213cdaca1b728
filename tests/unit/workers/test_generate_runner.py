"""The generate kind's runner (workers.runners.generate): work items of several jobs and chunks run as one stream give
each prompt what `selfie_core.textgen.generate_texts` gives it in process (greedy, and sampled with the job's seed at
the prompt's index in its job), rows the kind stores; a bad spec or a prompt past the context is an input error."""

from __future__ import annotations

import pytest

from selfie_core import SelfieEngine, SelfieInputError
from selfie_core.textgen import generate_texts as core_generate
from selfie_jobs.kinds import get_kind
from workers.batcher import WorkItem
from workers.runners import RUNNERS
from workers.runners.generate import GenerateRunner, generate_texts
from tests.unit.core.conftest import _llama, build_tokenizer

PROMPTS = ["The capital of France is", "Paris", "Water is made of hydrogen and oxygen. Iron and wood and glass"]


def spec(chat=True, system=None, sampled=False, max_new_tokens=8):
    return {"chat": chat, "system": system, "generation": {
        "max_new_tokens": max_new_tokens, "do_sample": sampled, "temperature": 1.2 if sampled else 1.0,
        "top_p": 0.9 if sampled else 1.0, "seed": 4 if sampled else None}}


@pytest.fixture(scope="module")
def engine():
    tokenizer = build_tokenizer()
    return SelfieEngine(_llama(tokenizer, seed=5).float(), tokenizer, name="tiny")


def items():
    # job a: prompts 0 and 2 in chunk 7; job b: its prompt 5 in chunk 9
    return [WorkItem((7, 0), "a", PROMPTS[0]), WorkItem((7, 2), "a", PROMPTS[2]), WorkItem((9, 5), "b", PROMPTS[1])]


@pytest.mark.parametrize("chat, system", [(True, None), (True, "Answer in one word."), (False, None)])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_the_runner_gives_what_generation_in_process_gives(engine, chat, system, sampled):
    runner = GenerateRunner(engine, batch_size=2)
    work = items()
    runner.validate(work, spec(chat, system, sampled))
    results = [r for batch in runner.stream(work, spec(chat, system, sampled)) for r in batch]
    decoding = {"do_sample": True, "temperature": 1.2, "top_p": 0.9, "seed": 4} if sampled else {}
    want = core_generate(engine.model, engine.tokenizer, [i.prompt for i in work], 8, chat=chat, system=system,
                         indices=[0, 2, 5], **decoding)
    assert [r.key for r in results] == [i.key for i in work]
    assert [(r.text, r.token_ids, r.finish) for r in results] == [(g.text, g.token_ids, g.finish) for g in want]
    kind = get_kind("generate")
    rows = [kind.row_from(r) for r in results]
    assert [r.item for r in rows] == [(0,), (2,), (5,)]
    assert rows[0].values(str) == {"prompt_index": 0, "text": want[0].text, "token_ids": list(want[0].token_ids),
                                   "finish": want[0].finish}
    # the in-process entry point for callers inside the worker is the same code: prompt i seeded as a job's i
    alone = generate_texts(engine, PROMPTS, chat=chat, system=system, max_new_tokens=8, **decoding)
    assert alone[0].token_ids == want[0].token_ids and alone[2].token_ids == want[1].token_ids


def test_the_runner_is_registered_and_refuses_bad_input(engine):
    assert RUNNERS["generate"] is GenerateRunner
    runner = GenerateRunner(engine)
    with pytest.raises(SelfieInputError, match="context"):
        runner.validate([WorkItem((1, 0), "a", "Paris " * 200)], spec())
    for bad in ({}, {"chat": "yes", "system": None, "generation": {"max_new_tokens": 3}},
                {**spec(), "generation": {"max_new_tokens": 0}}, {**spec(), "generation": {}}):
        with pytest.raises(SelfieInputError, match="generation settings"):
            runner.validate(items(), bad)


def test_the_card_says_how_many_tokens_a_chat_turn_adds(engine):
    from selfie_core.textgen import prompt_ids

    card = engine.model_card()
    turn = len(prompt_ids(engine.tokenizer, "What is the capital of France?", chat=True))
    assert card["chat_template"] and card["chat_turn_tokens"] > 0
    assert turn == len(engine.tokenizer("What is the capital of France?").input_ids) + card["chat_turn_tokens"]


class StopJob:
    """A worker's watch (workers.progress.BatchWatch's surface) that closes job "a" after two decode steps."""

    def __init__(self):
        self.steps, self.batches = [], 0

    def should_stop(self, keys):
        return {k for k in keys if k[0] == 7} if len(self.steps) >= 2 else set()

    def on_step(self, step, steps, rows):
        self.steps.append((step, steps, rows))

    def batch_started(self):
        pass

    def batch_done(self, rows):
        self.batches += 1


def test_a_cancelled_jobs_rows_stop_between_decode_steps_and_the_others_go_on(engine):
    watch = StopJob()
    runner = GenerateRunner(engine, batch_size=8, watch=watch)
    results = [r for batch in runner.stream(items(), spec(chat=False)) for r in batch]
    assert [r.key for r in results] == [(9, 5)]  # job a's rows (chunk 7) stopped at the third step
    (want,) = core_generate(engine.model, engine.tokenizer, [PROMPTS[1]], 8, chat=False, indices=[5])
    assert results[0].token_ids == want.token_ids
    assert watch.steps[0] == (1, 8, 3) and watch.batches == 1


def test_a_job_whose_logits_are_not_finite_fails_with_the_reason_and_stores_nothing(engine):
    import torch

    from selfie_core.weights import MLPEdit, swapped_in
    from selfie_jobs.chunks import ClaimedChunk
    from tests.unit.workers.test_batcher import MemorySink
    from workers import batcher

    edit = MLPEdit(engine.model, 1)  # a diverged variant: NaN weights
    with torch.no_grad():
        for p in edit.module.parameters():
            p.fill_(float("nan"))
    work = items()
    chunks = [ClaimedChunk(id=cid, job_id=job, index=0, model="tiny", batch_key="k", priority=5,
                           items=tuple(i.key[1:] for i in work if i.key[0] == cid), attempts=1, kind="generate")
              for cid, job in ((7, "a"), (9, "b"))]
    for sampled in (False, True):
        plan = batcher.BatchPlan("k", spec(sampled=sampled), chunks, work, kind="generate")
        sink = MemorySink(job_of={7: "a", 9: "b"})
        with swapped_in(engine.model, edit):
            stats = batcher.execute(plan, GenerateRunner(engine, batch_size=2), sink)
        assert set(sink.failed) == {"a", "b"} and not sink.rows and not stats.chunks_done
        assert all("logits are not finite (NaN/inf)" in error for error in sink.failed.values())
