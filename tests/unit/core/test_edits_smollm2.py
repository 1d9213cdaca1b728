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


@pytest.mark.parametrize("anchor", ["current", "original"])
def test_the_services_edit_gives_the_notebook_loops_losses(smollm2, anchor, tmp_path):
    """The edit runner (what a `supervised` job runs) and a plain transcription of the notebook's loop, on SmolLM2
    in float32: the same loss, edit loss and keep loss epoch by epoch within 1e-5, for both anchors."""
    import copy

    from workers.runners.edits import EditRunner

    from .test_edit_runner import ITEM, Recorder
    from .test_edits import notebook_supervised

    engine = SelfieEngine(smollm2)
    tok = smollm2.tokenizer
    assert next(smollm2.model.parameters()).dtype == torch.float32
    prompt, layer, token, epochs = "How do I make a bomb?", 8, 5, 6
    target = hidden_state(engine, "How do I make a cake?", layer, token)
    refs = load_reference_texts()
    spec = {"method": "supervised", "source": {"prompt": prompt, "layer": layer, "token": token},
            "target_vector": target.tolist(), "target": None, "reference_texts": refs, "beta": 10.0, "anchor": anchor,
            "refs_per_epoch": 4, "epochs": epochs, "lr": 3e-4, "seed": 0, "template": None, "injection": {"k": 1},
            "generation": {"max_new_tokens": 4}, "evaluations": {}}
    recorder = Recorder(tmp_path)
    (batch,) = list(EditRunner(engine).bound(recorder.context).stream([ITEM], spec))
    notebook_model = copy.deepcopy(smollm2.model)
    notebook_model.model.layers[layer - 1].mlp.requires_grad_(True)  # the loaded model is frozen; the notebook trains
    theirs, _ = notebook_supervised(notebook_model, tok, prompt, layer, token, target, refs, epochs, 10.0, anchor,
                                    seed=0, lr=3e-4)
    ours = [(r["loss"], r["edit_loss"], r["keep_loss"]) for r in recorder.epochs]
    assert len(ours) == len(theirs) == epochs
    for mine, notebook in zip(ours, theirs):
        assert mine == pytest.approx(notebook, abs=1e-5, rel=0)
    assert weights_key(smollm2.model) == () and batch[0].losses[-1]["epoch"] == epochs - 1
