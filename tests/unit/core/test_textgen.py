"""The `generate` kind's generation loop (selfie_core.textgen.stream_generations, generate_texts): a batch gives each
prompt the tokens it gets alone (greedy and seeded samples, chat and raw, in float32 as workers run), a seeded sample
is the same every time, a row ends at EOS or at max_new_tokens, a stopped row gets no result, and the prompt is the
chat template's user turn with the assistant's turn opened."""

from __future__ import annotations

import pytest
import torch

from selfie_core import SelfieInputError
from selfie_core.textgen import (FINISH_EOS, FINISH_LENGTH, generate_texts, prompt_ids, row_seed,
                                 stream_generations)
from selfie_core.weights import MLPEdit, weights_key

from .conftest import _llama

PROMPTS = ["The capital of France is", "Paris", "Water is made of hydrogen and oxygen. Iron and wood and glass",
           "The quick brown fox jumps over", "a"]
SAMPLED = {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 11}


@pytest.fixture(scope="module")
def llama32(tokenizer):
    return _llama(tokenizer, seed=5).float()


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "raw"])
@pytest.mark.parametrize("decoding", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_a_batch_gives_every_prompt_what_it_gets_alone(llama32, tokenizer, chat, decoding):
    together = generate_texts(llama32, tokenizer, PROMPTS, 10, chat=chat, batch_size=len(PROMPTS), **decoding)
    alone = [generate_texts(llama32, tokenizer, [p], 10, chat=chat, batch_size=1, indices=[i], **decoding)[0]
             for i, p in enumerate(PROMPTS)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.key for g in together] == list(range(len(PROMPTS)))
    pairs = generate_texts(llama32, tokenizer, PROMPTS, 10, chat=chat, batch_size=2, **decoding)
    assert [g.token_ids for g in pairs] == [g.token_ids for g in together]


def test_seeded_samples_repeat_and_depend_on_seed_and_index_only(llama32, tokenizer):
    first = generate_texts(llama32, tokenizer, PROMPTS, 10, **SAMPLED)
    assert [g.token_ids for g in generate_texts(llama32, tokenizer, PROMPTS, 10, **SAMPLED)] == \
        [g.token_ids for g in first]
    other_seed = generate_texts(llama32, tokenizer, PROMPTS, 10, **{**SAMPLED, "seed": 12})
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in first]
    greedy = generate_texts(llama32, tokenizer, PROMPTS, 10)
    assert [g.token_ids for g in greedy] != [g.token_ids for g in first]
    # the same prompt at two places draws two samples; at the same index, the same one
    twice = generate_texts(llama32, tokenizer, [PROMPTS[0]] * 2, 10, **SAMPLED)
    assert twice[0].token_ids == first[0].token_ids and twice[1].token_ids != twice[0].token_ids
    assert row_seed(11, 0) != row_seed(11, 1) != row_seed(12, 1)


def test_a_row_ends_at_eos_or_at_max_new_tokens(llama32, tokenizer):
    (free,) = generate_texts(llama32, tokenizer, [PROMPTS[2]], 6, chat=False)
    assert free.finish == FINISH_LENGTH and len(free.token_ids) == 6
    assert free.text == tokenizer.decode(list(free.token_ids), skip_special_tokens=True)
    config = llama32.generation_config
    before = config.eos_token_id
    config.eos_token_id = [free.token_ids[2], tokenizer.eos_token_id]  # the third token generated ends it
    try:
        (ended,) = generate_texts(llama32, tokenizer, [PROMPTS[2]], 6, chat=False)
    finally:
        config.eos_token_id = before
    first = list(free.token_ids).index(free.token_ids[2]) + 1
    assert ended.finish == FINISH_EOS and ended.token_ids == free.token_ids[:first]
    assert ended.text == tokenizer.decode(list(free.token_ids[: first - 1]), skip_special_tokens=True)


def test_a_stopped_row_gets_no_result_and_the_others_are_unchanged(llama32, tokenizer):
    rows = [prompt_ids(tokenizer, p, chat=False) for p in PROMPTS]
    keys = [("job", i) for i in range(len(PROMPTS))]
    asked: list[list] = []

    def should_stop(going):
        asked.append(list(going))
        return {("job", 1), ("job", 3)} if len(asked) > 2 else set()

    got = [g for batch in stream_generations(llama32, tokenizer, rows, 8, keys=keys, should_stop=should_stop)
           for g in batch]
    free = generate_texts(llama32, tokenizer, PROMPTS, 8, chat=False)
    assert [g.key for g in got] == [("job", 0), ("job", 2), ("job", 4)]
    assert [g.token_ids for g in got] == [free[i].token_ids for i in (0, 2, 4)]
    assert asked[0] == keys  # asked before the batch with every row, then between decode steps
    before = [g for batch in stream_generations(llama32, tokenizer, rows, 8, keys=keys, batch_size=2,
                                                should_stop=lambda going: {("job", 0), ("job", 1)})
              for g in batch]
    assert [g.key for g in before] == keys[2:]


def test_the_chat_prompt_is_one_user_turn_with_the_assistant_turn_opened(tokenizer):
    ids = prompt_ids(tokenizer, "What is this?", chat=True)
    assert tokenizer.decode(ids) == "<s><|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    with_system = prompt_ids(tokenizer, "What is this?", chat=True, system="Be brief.")
    assert tokenizer.decode(with_system).startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert prompt_ids(tokenizer, "What is this?", chat=False) == list(tokenizer("What is this?").input_ids)
    with pytest.raises(SelfieInputError, match="system"):
        prompt_ids(tokenizer, "What is this?", chat=False, system="Be brief.")
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(SelfieInputError, match="no chat template"):
            prompt_ids(tokenizer, "What is this?", chat=True)
    finally:
        tokenizer.chat_template = saved


def test_an_edit_is_swapped_in_for_the_call_only(llama32, tokenizer):
    before = generate_texts(llama32, tokenizer, PROMPTS[:2], 6)
    edit = MLPEdit(llama32, 1)
    with torch.no_grad():
        for p in edit.module.parameters():
            p.mul_(-5.0)
    edited = generate_texts(llama32, tokenizer, PROMPTS[:2], 6, edit=edit)
    assert [g.token_ids for g in edited] != [g.token_ids for g in before]
    assert weights_key(llama32) == ()
    assert [g.token_ids for g in generate_texts(llama32, tokenizer, PROMPTS[:2], 6)] == \
        [g.token_ids for g in before]


def test_lengths_are_checked_against_the_context(llama32, tokenizer):
    from selfie_core.textgen import check_lengths

    with pytest.raises(SelfieInputError, match="context"):
        check_lengths([[1] * 250], 10, 256)
    with pytest.raises(SelfieInputError, match="no tokens"):
        check_lengths([[]], 10, 256)
    check_lengths([[1] * 246], 10, 256)


def test_logits_that_are_not_finite_fail_the_generation_instead_of_giving_tokens(llama32, tokenizer):
    edit = MLPEdit(llama32, 1)  # a diverged variant: NaN weights in one MLP
    with torch.no_grad():
        for p in edit.module.parameters():
            p.fill_(float("nan"))
    for decoding in ({}, SAMPLED):
        with pytest.raises(SelfieInputError, match=r"logits are not finite \(NaN/inf\) at decode step 0"):
            generate_texts(llama32, tokenizer, PROMPTS[:2], 4, chat=False, edit=edit, **decoding)
    assert weights_key(llama32) == ()  # the model's own weights are back


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-5])
def test_a_tiny_temperature_samples_the_greedy_tokens(llama32, tokenizer, temperature):
    greedy = generate_texts(llama32, tokenizer, PROMPTS, 6, chat=False)
    cold = generate_texts(llama32, tokenizer, PROMPTS, 6, chat=False, do_sample=True, temperature=temperature,
                          seed=3)
    assert [g.token_ids for g in cold] == [g.token_ids for g in greedy]
