"""Static (fixed-shape, CUDA-graph ready) decode steps give what steps over a growing cache give."""

import pytest
import torch

from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest, SelfieEngine
from selfie_core import decoding
from selfie_core.adapters import get_adapter
from selfie_core.generation import generate_batch, prepare_prompt_state
from selfie_core.modelcall import make_cache

from .conftest import _llama

CPU = torch.device("cpu")


def _run(model, tokenizer, *, eos_ids=(), rows=6, max_new_tokens=10, decode="static"):
    prepared = InterpretationTemplate().prepare(tokenizer)
    state = prepare_prompt_state(model, prepared, CPU)
    torch.manual_seed(3)
    vectors = torch.randn(rows, model.config.hidden_size, dtype=next(model.parameters()).dtype) * 3
    return generate_batch(model, get_adapter(model).blocks[1], state, vectors, mode="replace", strength=1.0,
                          max_new_tokens=max_new_tokens, eos_ids=list(eos_ids), device=CPU, decode=decode)


def _assert_same(a_rows, b_rows, tol=1e-9):
    assert [r.token_ids for r in a_rows] == [r.token_ids for r in b_rows]
    for a, b in zip(a_rows, b_rows):
        assert max((abs(x - y) for x, y in zip(a.p_inject, b.p_inject)), default=0.0) <= tol


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "neox"])
def test_static_steps_equal_growing_steps(request, tokenizer, model_name):
    model = request.getfixturevalue(model_name)
    static = _run(model, tokenizer)
    _assert_same(static, _run(model, tokenizer, decode="growing"))
    # rows leave the batch at EOS at different steps: the same in both ways
    eos = static[0].token_ids[4]
    static = _run(model, tokenizer, eos_ids=[eos])
    growing = _run(model, tokenizer, eos_ids=[eos], decode="growing")
    assert static[0].token_ids[-1] == eos and len(static[0].token_ids) <= 5
    _assert_same(static, growing)


def test_eager_attention_gets_an_additive_mask(tokenizer):
    model = _llama(tokenizer, layers=3, seed=5)
    model.set_attn_implementation("eager")
    _assert_same(_run(model, tokenizer), _run(model, tokenizer, decode="growing"))


def test_rows_kept_after_eos_change_nothing(llama, tokenizer, monkeypatch):
    """With a CUDA graph, finished rows stay in the batch until half of it has finished; their later tokens are
    dropped. The same policy on the CPU gives what dropping rows at once gives."""
    eos = _run(llama, tokenizer)[2].token_ids[3]
    at_once = _run(llama, tokenizer, eos_ids=[eos], rows=8, decode="growing")
    calls = []

    def graph_policy(self, finished, batch):
        calls.append((finished, batch))
        return 2 * finished >= batch

    monkeypatch.setattr(decoding.StaticDecoder, "prune_now", graph_policy)
    kept = _run(llama, tokenizer, eos_ids=[eos], rows=8)
    _assert_same(at_once, kept)
    assert any(0 < f and 2 * f < b for f, b in calls), "no row was ever kept after its EOS"


def test_unknown_decode_mode_is_refused(llama, tokenizer):
    with pytest.raises(ValueError, match="decode must be one of"):
        _run(llama, tokenizer, decode="fast")


def test_static_decoding_needs_one_device_and_preallocated_layers(llama, tokenizer):
    state = prepare_prompt_state(llama, InterpretationTemplate().prepare(tokenizer), CPU)
    preallocated = make_cache(llama, state.kv, 2, capacity=state.length + 4)
    growing = make_cache(llama, state.kv, 2)
    assert decoding.static_decoding_supported(llama, preallocated)
    assert not decoding.static_decoding_supported(llama, growing)
    decoder = decoding.StaticDecoder(llama, preallocated, state.length)
    token = torch.tensor([5, 6])
    for _ in range(4):
        assert decoder.step(token).shape == (2, llama.config.vocab_size)
    with pytest.raises(RuntimeError, match="capacity"):
        decoder.step(token)


def test_graphs_are_a_cuda_only_option_and_change_nothing_on_cpu(llama, tokenizer, monkeypatch):
    """On by default; on the CPU the engine takes growing steps either way (static ones only cost more there)."""
    requests = [InterpretRequest("The Eiffel Tower is located in Paris", layer, 3) for layer in (1, 2, 3)]
    graphed, plain = SelfieEngine(llama, tokenizer), SelfieEngine(llama, tokenizer, cuda_graphs=False)
    assert graphed.cuda_graphs and not plain.cuda_graphs
    modes = []
    real = decoding.GrowingDecoder.__init__

    def spy(self, *args, **kwargs):
        modes.append("growing")
        real(self, *args, **kwargs)

    monkeypatch.setattr(decoding.GrowingDecoder, "__init__", spy)
    gen = GenerationConfig(max_new_tokens=6)
    assert [r.token_ids for r in plain.interpret(requests, generation=gen)] == \
        [r.token_ids for r in graphed.interpret(requests, generation=gen)]
    assert modes == ["growing", "growing"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_cuda_graph_steps_equal_eager_steps(tokenizer, attention):
    """float32: the engine with graphs (attending through SDPA or the Triton kernel) gives the tokens and relevancy
    of eager SDPA steps."""
    model = _llama(tokenizer, layers=4, seed=7).to("cuda", torch.float32)
    requests = [InterpretRequest("The Eiffel Tower is located in Paris, the capital of France.", layer, t)
                for layer in range(5) for t in (2, 5, 8)]
    gen = GenerationConfig(max_new_tokens=12)
    eager = SelfieEngine(model, tokenizer, cuda_graphs=False).interpret(requests, injection=InjectionConfig(k=2),
                                                                        generation=gen)
    graphed = SelfieEngine(model, tokenizer, cuda_graphs=True, decode_attention=attention).interpret(
        requests, injection=InjectionConfig(k=2), generation=gen)
    assert [r.token_ids for r in eager] == [r.token_ids for r in graphed]
    for a, b in zip(eager, graphed):
        assert max((abs(x - y) for x, y in zip(a.relevancy, b.relevancy)), default=0.0) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_compute_what_static_eager_steps_compute_in_bf16(tokenizer):
    """bf16: a replayed graph runs the kernels of the eager static step, so tokens and probabilities are
    bit-identical (growing steps attend through other kernels, which round differently)."""
    model = _llama(tokenizer, layers=4, seed=7).to("cuda", torch.bfloat16)
    prepared = InterpretationTemplate().prepare(tokenizer)
    device = torch.device("cuda")
    state = prepare_prompt_state(model, prepared, device)
    torch.manual_seed(3)
    vectors = torch.randn(24, model.config.hidden_size, device=device, dtype=torch.bfloat16) * 3

    def run(decode):
        return generate_batch(model, get_adapter(model).blocks[2], state, vectors, mode="replace", strength=1.0,
                              max_new_tokens=12, eos_ids=[], device=device, decode=decode)

    _assert_same(run("static"), run("graphs"), tol=0.0)
