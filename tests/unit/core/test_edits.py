"""Model edits (selfie_core.edits): the MLP states, the swapped-in copy, and Supervised / Reinforcement Control
against a plain transcription of the original notebooks' loops."""

from __future__ import annotations

import copy

import pytest
import torch

from selfie_core import GenerationConfig, InjectionConfig, InterpretRequest, SelfieEngine, SelfieInputError
from selfie_core.adapters import get_adapter
from selfie_core.edits import ReinforceEdit, SupervisedEdit, hidden_state, read_block_states, reinforce_template
from selfie_core.errors import UnsupportedArchitectureError
from selfie_core.weights import MLPEdit, swapped_in, weights_key

from .conftest import _llama

PROMPT = "The Eiffel Tower is located in Paris, the capital of France."
TARGET_PROMPT = "Water is made of hydrogen and oxygen."
REFS = ["The quick brown fox jumps over the lazy dog.", "Iron and wood and glass are materials.",
        "Sure, I will summarize the message: it is about a city.", "The capital of France is Paris.",
        "A river and a tower.", "What is this?"]


@pytest.fixture(scope="module")
def llama32(tokenizer):
    """A float32 tiny LLaMA: the notebooks' losses are compared in float32."""
    return _llama(tokenizer, seed=3).float()


def _ids(tokenizer, text):
    return list(tokenizer(text).input_ids)


# -- states -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_post_is_mlp_of_pre_mlp_plus_residual(request, tokenizer, fixture):
    model = request.getfixturevalue(fixture)
    adapter = get_adapter(model)
    ids = _ids(tokenizer, PROMPT)
    hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for block in range(adapter.num_layers):
        s = read_block_states(model, adapter, ids, block, torch.device("cpu"))
        assert s.post.shape == s.pre_mlp.shape == s.residual.shape == (len(ids), hidden[0].shape[-1])
        with torch.no_grad():
            rebuilt = adapter.mlp(block)(s.pre_mlp) + s.residual
        assert torch.allclose(rebuilt, s.post, atol=1e-12, rtol=0)
        assert not torch.allclose(s.residual, s.post)  # the MLP does add something
        if block + 1 < adapter.num_layers:  # hidden_states[num_layers] is after the final norm
            assert torch.equal(s.post, hidden[block + 1][0])


@pytest.mark.parametrize("name", ["llama2", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2",
                                  "gpt_neox"])
def test_mlp_states_in_every_family(name, tokenizer):
    """The identity holds in every family whose MLP output is added to the stream it reads; the others (Gemma
    normalises the MLP's output, GPT-NeoX adds it to the block input) are refused by name."""
    from .test_families import BUILDERS

    torch.manual_seed(0)
    model = BUILDERS[name](tokenizer).float().eval()
    adapter = get_adapter(model)
    ids = _ids(tokenizer, PROMPT)
    if name in ("gemma2", "gemma3", "gpt_neox"):
        with pytest.raises(UnsupportedArchitectureError, match="normalises|parallel_residual"):
            read_block_states(model, adapter, ids, 1, torch.device("cpu"))
        return
    hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    s = read_block_states(model, adapter, ids, 1, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(adapter.mlp(1)(s.pre_mlp) + s.residual, s.post, atol=1e-5, rtol=0)
    assert torch.equal(s.post, hidden[2][0])


def test_parallel_residual_neox_is_refused(neox, tokenizer):
    adapter = get_adapter(neox)
    with pytest.raises(UnsupportedArchitectureError, match="parallel_residual"):
        read_block_states(neox, adapter, _ids(tokenizer, PROMPT), 1, torch.device("cpu"))


# -- the swapped-in copy ---------------------------------------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_base_outputs_are_bit_identical_after_an_edit(llama, tokenizer):
    ids = _ids(tokenizer, PROMPT)
    before = _logits(llama, ids)
    own = llama.model.layers[1].mlp
    params = {n: p.detach().clone() for n, p in llama.named_parameters()}
    edit = MLPEdit(llama, 1)
    with torch.no_grad():
        for p in edit.module.parameters():
            p.mul_(3.0)
    with swapped_in(llama, edit):
        assert llama.model.layers[1].mlp is edit.module
        assert weights_key(llama) == (edit.key(),)
        assert not torch.equal(_logits(llama, ids), before)
    with pytest.raises(RuntimeError, match="boom"), swapped_in(llama, edit):
        raise RuntimeError("boom")
    assert llama.model.layers[1].mlp is own and weights_key(llama) == ()
    assert torch.equal(_logits(llama, ids), before)
    assert all(torch.equal(p, params[n]) for n, p in llama.named_parameters())


def test_edit_keys_change_with_each_step_and_never_repeat(llama):
    a, b = MLPEdit(llama, 0), MLPEdit(llama, 0)
    assert a.key() != b.key()
    key = a.key()
    opt = torch.optim.Adam(a.module.parameters(), lr=1e-3)
    a.module(torch.randn(2, 64, dtype=torch.float64)).sum().backward()
    opt.step()
    assert a.key() != key


def test_interpretation_cache_is_keyed_by_the_weights_in_use(llama, tokenizer):
    """An engine that has cached the interpretation prompt's pass on the base model must not read it under an
    edit, nor one edit's under the same edit after a step: compared with engines that never saw other weights."""
    reqs = [InterpretRequest(PROMPT, layer, 5) for layer in (1, 3)]
    inj, gen = InjectionConfig(k=2), GenerationConfig(max_new_tokens=6)
    warm = SelfieEngine(llama, tokenizer)
    base = warm.interpret(reqs, injection=inj, generation=gen)
    edit = MLPEdit(llama, 0)  # block 0: below k, so the prompt's cached lower-block states change too
    with torch.no_grad():
        for p in edit.module.parameters():
            p.mul_(4.0)
    with swapped_in(llama, edit):
        edited = warm.interpret(reqs, injection=inj, generation=gen)
        fresh = SelfieEngine(llama, tokenizer).interpret(reqs, injection=inj, generation=gen)
    assert [r.token_ids for r in edited] == [r.token_ids for r in fresh]
    assert [r.relevancy for r in edited] == [r.relevancy for r in fresh]
    assert [r.relevancy for r in edited] != [r.relevancy for r in base]
    with torch.no_grad():
        for p in edit.module.parameters():
            p.mul_(0.5)  # in place, as an optimiser step changes it
    with swapped_in(llama, edit):
        stepped = warm.interpret(reqs, injection=inj, generation=gen)
        fresh = SelfieEngine(llama, tokenizer).interpret(reqs, injection=inj, generation=gen)
    assert [r.relevancy for r in stepped] == [r.relevancy for r in fresh]
    assert [r.relevancy for r in warm.interpret(reqs, injection=inj, generation=gen)] == [r.relevancy for r in base]


# -- Supervised Control against the notebook -------------------------------------------------------------------
def _notebook_states(model, ids, layer):
    """The notebook's model_forward_interpret: hidden_states plus (pre_mlp, residual) of block layer-1."""
    got = {}
    norm = model.model.layers[layer - 1].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, a, o: got.update(residual=a[0][0], pre_mlp=o[0]))
    try:
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return hidden, got["pre_mlp"], got["residual"]


def notebook_supervised(model, tokenizer, prompt, layer, token, target, ref_texts, epochs, beta, anchor, seed,
                        lr=3e-4, refs_per_epoch=4):
    """The Supervised Controls notebook's loop, written out: the model's own MLP of block layer-1 is trained.
    Reference texts are run one at a time and drawn as the engine draws them (a seeded permutation per epoch);
    anchor "original" reads post_ref from the unedited model, "current" from the model as it is each epoch."""
    _, pre, res = _notebook_states(model, _ids(tokenizer, prompt), layer)
    source_pre_mlp, source_residual = pre[token], res[token]
    unedited = {i: _notebook_states(model, _ids(tokenizer, t), layer)[0][layer][0] for i, t in enumerate(ref_texts)}
    selected_mlp = model.model.layers[layer - 1].mlp
    optimizer = torch.optim.Adam(selected_mlp.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        out = selected_mlp(source_pre_mlp.unsqueeze(0)) + source_residual.unsqueeze(0)
        ref_idx = torch.randperm(len(ref_texts), generator=generator)[:refs_per_epoch].tolist()
        reference_inputs, reference_residuals, reference_targets = [], [], []
        for i in ref_idx:
            hidden, pre, res = _notebook_states(model, _ids(tokenizer, ref_texts[i]), layer)
            reference_inputs.append(pre)
            reference_residuals.append(res)
            reference_targets.append(hidden[layer][0] if anchor == "current" else unedited[i])
        ref_out = selected_mlp(torch.cat(reference_inputs)) + torch.cat(reference_residuals)
        edit_loss = torch.nn.MSELoss()(out, target.unsqueeze(0))
        keep_same_loss = torch.nn.MSELoss()(ref_out, torch.cat(reference_targets))
        loss = edit_loss + beta * keep_same_loss
        losses.append((loss.item(), edit_loss.item(), keep_same_loss.item()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses, selected_mlp


@pytest.mark.parametrize("anchor", ["current", "original"])
def test_supervised_matches_the_notebook_loop(llama32, tokenizer, anchor):
    engine = SelfieEngine(llama32, tokenizer)
    layer, token = 2, 6
    target = hidden_state(engine, TARGET_PROMPT, 3, 4)
    logits = _logits(llama32, _ids(tokenizer, PROMPT))
    run = SupervisedEdit(engine, PROMPT, layer, token, target, REFS, epochs=12, lr=3e-3, beta=10.0, anchor=anchor,
                         seed=7)
    reports = list(run)
    assert torch.equal(_logits(llama32, _ids(tokenizer, PROMPT)), logits)  # the resident model never changed
    reference = copy.deepcopy(llama32)
    losses, trained = notebook_supervised(reference, tokenizer, PROMPT, layer, token, target, REFS, 12, 10.0, anchor,
                                          seed=7, lr=3e-3)
    for ours, theirs in zip(reports, losses):
        assert abs(ours.loss - theirs[0]) < 1e-5 and abs(ours.edit_loss - theirs[1]) < 1e-5
        assert abs(ours.keep_loss - theirs[2]) < 1e-5
    for a, b in zip(run.edit.module.parameters(), trained.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    keep = [r.keep_loss for r in reports]
    if anchor == "current":  # the notebook's regulariser vanishes
        assert max(keep) < 1e-10
    else:
        assert keep[0] < 1e-10 and max(keep[1:]) > 1e-6  # zero until the first step moves the MLP
    assert reports[-1].edit_loss < reports[0].edit_loss


def test_supervised_is_deterministic_and_stops_between_epochs(llama32, tokenizer):
    engine = SelfieEngine(llama32, tokenizer)
    target = hidden_state(engine, TARGET_PROMPT, 2, 3)
    a = SupervisedEdit(engine, PROMPT, 2, 4, target, REFS, epochs=6, seed=1)
    b = SupervisedEdit(engine, PROMPT, 2, 4, target, REFS, epochs=6, seed=1)
    assert [r.to_dict() for r in a.run()] == [r.to_dict() for r in b.run()]
    c = SupervisedEdit(engine, PROMPT, 2, 4, target, REFS, epochs=6, seed=2)
    for report in c:
        if report.epoch == 2:
            break  # a cancel between epochs
    assert len(c.history) == 3 and weights_key(llama32) == ()
    assert [r.references for r in c.history] != [r.references for r in a.history[:3]]


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 0}, "layer 0 is out of range"),
    ({"layer": 5}, "layer 5 is out of range"),
    ({"epochs": 0}, "epochs"),
    ({"lr": 0.0}, "learning rate"),
    ({"lr": float("nan")}, "learning rate"),
    ({"anchor": "notebook"}, "anchor"),
    ({"target": [0.0] * 3}, "the target must be 64"),
    ({"target": [float("inf")] * 64}, "finite"),
    ({"references": []}, "reference texts"),
    ({"token": 99}, "token 99"),
])
def test_supervised_refuses_bad_input(llama32, tokenizer, kwargs, message):
    engine = SelfieEngine(llama32, tokenizer)
    args = {"layer": 2, "token": 3, "target": [0.0] * 64, "references": REFS, **kwargs}
    with pytest.raises(SelfieInputError, match=message):
        SupervisedEdit(engine, PROMPT, args.pop("layer"), args.pop("token"), args.pop("target"),
                       args.pop("references"), **args)


# -- Reinforcement Control against the notebook ----------------------------------------------------------------
def _judge(text):
    """Deterministic and varied on a random model's gibberish: all three rewards occur."""
    return (1, -1, 0)[len(text) % 3]


def notebook_reinforce(model, tokenizer, prompt, layer, judge, template, epochs, lr, k, max_new_tokens):
    """The Reinforcement Controls notebook's loop, written out: the model's own MLP is trained in place and each
    epoch's interpretations run on the model as it is (a new engine each epoch, as the notebook has no cache)."""
    _, pre, res = _notebook_states(model, _ids(tokenizer, prompt), layer)
    selected_mlp = model.model.layers[layer - 1].mlp
    optimizer = torch.optim.Adam(selected_mlp.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        out = selected_mlp(pre.unsqueeze(0)) + res.unsqueeze(0)
        results = SelfieEngine(model, tokenizer).interpret_vectors(
            list(out[0].detach()), template, InjectionConfig(k=k), GenerationConfig(max_new_tokens=max_new_tokens))
        rewards = [judge(r.text) for r in results]
        cossim = out[0] @ out[0].detach().T / out[0].detach().norm(dim=-1).unsqueeze(-1) ** 2
        cossim = cossim * torch.eye(cossim.shape[-1])
        cossim = cossim.sum(dim=-1)
        edit_loss = (-torch.tensor(rewards, dtype=out.dtype) * cossim).mean()
        history.append((edit_loss.item(), rewards, [r.text for r in results]))
        edit_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return history


def test_reinforce_matches_the_notebook_loop(llama32, tokenizer):
    engine = SelfieEngine(llama32, tokenizer)
    template = reinforce_template(tokenizer)
    run = ReinforceEdit(engine, PROMPT, 2, _judge, template=template, epochs=5, lr=1e-2, k=2, max_new_tokens=8)
    reports = run.run()
    theirs = notebook_reinforce(copy.deepcopy(llama32), tokenizer, PROMPT, 2, _judge, template, 5, 1e-2, 2, 8)
    assert len({tuple(r.rewards) for r in reports}) > 1 or len(set(reports[0].rewards)) > 1
    for ours, (loss, rewards, texts) in zip(reports, theirs):
        assert ours.rewards == rewards and ours.interpretations == texts
        assert abs(ours.loss - loss) < 1e-5
    assert len(reports[0].rewards) == len(_ids(tokenizer, PROMPT))
    assert weights_key(llama32) == ()


def test_reinforce_refuses_bad_input(llama32, tokenizer):
    engine = SelfieEngine(llama32, tokenizer)
    with pytest.raises(SelfieInputError, match="layer"):
        ReinforceEdit(engine, PROMPT, 0, _judge)
    with pytest.raises(SelfieInputError, match="judge"):
        ReinforceEdit(engine, PROMPT, 2, "keywords")
    with pytest.raises(SelfieInputError):
        ReinforceEdit(engine, PROMPT, 2, _judge, k=4)
    run = ReinforceEdit(engine, PROMPT, 2, lambda text: 2, epochs=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="must return"):
        run.run()
