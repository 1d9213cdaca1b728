"""Lenses (selfie_core.lenses): the batched path equals the naive per-item reference; the logit lens at the last
layer is the model's own prediction; bad input is refused before anything runs."""

import pytest
import torch

from selfie_core import SelfieEngine, SelfieInputError
from selfie_core.lenses import IDENTITY_PROMPT, LensRequest, reference_lenses, run_lenses

PROMPTS = ["The Eiffel Tower is located in Paris, the capital of France.", "A fox.", "Water is made of hydrogen"]


def _requests(tokenizer, num_layers):
    out = []
    for p in PROMPTS:
        n = len(tokenizer(p).input_ids)
        out += [LensRequest(p, layer, token, key=(p, layer, token))
                for layer in range(num_layers + 1) for token in (0, n // 2, n - 1)]
    return out


def _same(a, b):
    assert (a.key, a.layer, a.token, a.source_token) == (b.key, b.layer, b.token, b.source_token)
    for lens in ("model", "logit", "identity"):
        x, y = getattr(a, lens), getattr(b, lens)
        assert x.token_ids == y.token_ids, (lens, a.key)
        assert x.tokens == y.tokens
        assert x.probs == pytest.approx(y.probs, abs=1e-9)
    assert a.logit_model_prob == pytest.approx(b.logit_model_prob, abs=1e-9)
    assert a.identity_model_prob == pytest.approx(b.identity_model_prob, abs=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_batched_lenses_equal_the_naive_reference(family, request, tokenizer):
    model = request.getfixturevalue(family)
    engine = SelfieEngine(model, tokenizer)
    requests = _requests(tokenizer, engine.num_layers)
    batches = list(run_lenses(engine, requests, top_k=4, batch_size=7))
    assert [len(b) for b in batches] == [7] * (len(requests) // 7) + ([len(requests) % 7] if len(requests) % 7 else [])
    got = [r for b in batches for r in b]
    want = reference_lenses(model, tokenizer, requests, top_k=4)
    assert len(got) == len(want) == len(requests)
    for a, b in zip(got, want):
        _same(a, b)


def test_logit_lens_at_the_last_layer_is_the_models_own_prediction(engine, llama, tokenizer):
    last = engine.num_layers
    prompt = PROMPTS[0]
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        own = torch.softmax(llama(torch.tensor([ids])).logits[0], -1)
    readings = [r for b in run_lenses(engine, [LensRequest(prompt, last, t) for t in range(len(ids))], top_k=3)
                for r in b]
    for t, reading in enumerate(readings):
        values, top = own[t].topk(3)
        assert reading.logit.token_ids == top.tolist() == reading.model.token_ids
        assert reading.logit.probs == pytest.approx(values.tolist(), abs=1e-12)
        assert reading.matches("logit") is True
        assert reading.logit_model_prob == pytest.approx(float(values[0]), abs=1e-12)
        # the identity patch at the last layer writes the final norm's output: the same output layer reads it
        assert reading.identity.token_ids == reading.logit.token_ids


def test_identity_patch_of_the_identity_prompts_own_state_changes_nothing(engine, llama, tokenizer):
    """Writing back the state the identity prompt's last position already has must give its own prediction."""
    ids = tokenizer(IDENTITY_PROMPT).input_ids
    with torch.no_grad():
        own = torch.softmax(llama(torch.tensor([ids])).logits[0, -1], -1)
    requests = [LensRequest(IDENTITY_PROMPT, layer, len(ids) - 1) for layer in range(engine.num_layers + 1)]
    for reading in next(run_lenses(engine, requests, lenses=["identity"], top_k=2)):
        assert reading.identity.probs == pytest.approx(own.topk(2).values.tolist(), abs=1e-9)
        assert reading.logit is None and reading.matches("logit") is None


def test_early_layers_differ_between_the_lenses(engine, tokenizer):
    """Not a tautology: below the last layer the two lenses read the state differently."""
    readings = next(run_lenses(engine, [LensRequest(PROMPTS[0], 1, 3)], top_k=5))
    assert readings[0].logit.probs != pytest.approx(readings[0].identity.probs, abs=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"lenses": ["tuned"]}, "unknown lens 'tuned'"),
    ({"lenses": []}, "at least one lens"),
    ({"top_k": 0}, "top_k=0"),
    ({"top_k": 101}, "top_k=101"),
    ({"top_k": True}, "top_k=True"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_settings_are_refused(engine, kwargs, message):
    with pytest.raises(SelfieInputError, match=message):
        run_lenses(engine, [LensRequest(PROMPTS[0], 1, 1)], **kwargs)


@pytest.mark.parametrize("request_, message", [
    (LensRequest(PROMPTS[0], 5, 1), "layer 5 is out of range"),
    (LensRequest(PROMPTS[1], 1, 40), "token 40 is out of range"),
    (LensRequest("  ", 1, 0), "prompt is empty"),
])
def test_bad_requests_are_refused_before_any_batch(engine, request_, message):
    with pytest.raises(SelfieInputError, match=message):
        run_lenses(engine, [LensRequest(PROMPTS[0], 1, 1), request_])


def test_requests_stopped_before_their_lens_batch_are_not_read(engine, tokenizer):
    """`should_stop` (a cancelled job's rows) is asked before each batch; the others read as without it."""
    requests = _requests(tokenizer, engine.num_layers)[:12]
    doomed = {r.key for r in requests[::2]}
    asked = []

    def should_stop(keys):
        asked.append(len(keys))
        return doomed & set(keys) if len(asked) > 1 else ()  # from the second batch on

    got = [r for b in run_lenses(engine, requests, top_k=3, batch_size=4, should_stop=should_stop) for r in b]
    plain = [r for b in run_lenses(engine, requests, top_k=3, batch_size=4) for r in b]
    assert asked == [4, 4, 4]
    kept = [r for i, r in enumerate(plain) if i < 4 or r.key not in doomed]
    assert [r.key for r in got] == [r.key for r in kept]
    for a, b in zip(got, kept):
        _same(a, b)
