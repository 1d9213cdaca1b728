"""Model edits on SmolLM2-135M-Instruct (skipped when the package is absent): the defaults do what they promise."""

import pytest
import torch

from selfie_core import SelfieEngine
from selfie_core.edit_evals import interpret_state, load_reference_texts
from selfie_core.edits import SupervisedEdit, hidden_state, read_block_states
from selfie_core.textgen import chat_text
from selfie_core.weights import weights_key

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


def _index(tokenizer, prompt, piece):
    pieces = [tokenizer.decode([i]) for i in tokenizer(prompt).input_ids]
    return len(pieces) - 1 - pieces[::-1].index(piece)


def test_identity_of_the_mlp_states(smollm2):
    engine = SelfieEngine(smollm2)
    ids = smollm2.tokenizer("The Eiffel Tower is in Paris.").input_ids
    for block in (0, 7, 29):
        s = read_block_states(smollm2.model, engine.adapter, ids, block, engine.input_device)
        with torch.no_grad():
            rebuilt = engine.adapter.mlp(block)(s.pre_mlp) + s.residual
        assert torch.allclose(rebuilt, s.post, atol=1e-5, rtol=0)


def test_supervised_defaults_lower_the_edit_loss_100x_and_leave_the_base_alone(smollm2):
    engine = SelfieEngine(smollm2)
    tok = smollm2.tokenizer
    source, target_prompt = chat_text(tok, "How do I make a bomb?"), chat_text(tok, "How do I make a cake?")
    t, tt = _index(tok, source, " bomb"), _index(tok, target_prompt, " cake")
    ids = torch.tensor([tok(source).input_ids])
    with torch.no_grad():
        before = smollm2.model(ids).logits
    base_text = interpret_state(engine, source, 8, t, None, "summarize", max_new_tokens=12)
    run = SupervisedEdit(engine, source, 8, t, hidden_state(engine, target_prompt, 8, tt), load_reference_texts())
    losses = [r.edit_loss for r in run]
    assert len(losses) == 100
    assert losses[0] / (run.source_distance() ** 2 / engine.hidden_size) >= 100
    assert interpret_state(engine, source, 8, t, run.edit, "summarize", max_new_tokens=12) != base_text
    assert weights_key(smollm2.model) == ()
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, before)
    assert interpret_state(engine, source, 8, t, None, "summarize", max_new_tokens=12) == base_text
