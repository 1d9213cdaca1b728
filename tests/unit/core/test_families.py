"""Each supported model family, as a tiny random model in float32, gives the reference implementation's tokens and
relevancy (within 1e-5): the engine's shortcuts (skipped lower blocks, shared prompt cache, packed relevancy with
4D masks) hold for the family's own embeddings, norms, attention (soft-capping, q/k norms, fused qkv, sliding
windows) and caches."""

from __future__ import annotations

import pytest
import torch

from selfie_core import (GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest, SelfieEngine,
                         UnsupportedArchitectureError)
from selfie_core.adapters import FAMILIES, get_adapter
from selfie_core.reference import reference_interpret

PROMPTS = ["The Eiffel Tower is located in Paris, the capital of France.", "Water is made of hydrogen"]
GEN = GenerationConfig(max_new_tokens=6)
TOL = 1e-5


def _common(tokenizer):
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, max_position_embeddings=256)


def _llama2(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, **_common(tok)))


def _llama3(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                                        tie_word_embeddings=True, **_common(tok)))


def _mistral(tok):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                                            **_common(tok)))


def _qwen2(tok):  # Qwen2/2.5: biased q, k, v projections; a sliding window on the upper layers when switched on
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                        sliding_window=64, max_window_layers=2, tie_word_embeddings=True,
                                        **_common(tok)))


def _qwen3(tok):  # per-head q/k RMSNorm, head_dim independent of hidden_size / heads
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, **_common(tok)))


def _gemma2(tok):  # scaled embeddings, (1 + weight) norms, soft-capping, alternating sliding/full layers, eager
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          sliding_window=64, attn_logit_softcapping=50.0,
                                          final_logit_softcapping=30.0, query_pre_attn_scalar=16, **_common(tok)))


def _gemma3(tok):  # Gemma 2's traits, q/k norms, a local rope base for sliding layers, 5 sliding : 1 full
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              sliding_window=64, final_logit_softcapping=30.0,
                                              query_pre_attn_scalar=16, **_common(tok)))


def _phi3(tok):  # fused qkv and gate_up projections
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                                      **_common(tok)))


def _gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=4, n_head=4, n_positions=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      initializer_range=0.2))


def _neox(tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=4, **_common(tok)))


BUILDERS = {"llama2": _llama2, "llama3": _llama3, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
            "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3, "gpt2": _gpt2, "gpt_neox": _neox}


def tiny(name, tokenizer, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name](tokenizer).to(torch.float32).eval()


def requests(tokenizer, layers):
    reqs = []
    for p in PROMPTS:
        n = len(tokenizer(p).input_ids)
        for layer in layers:
            for t in (1, n // 2, n - 1):
                reqs.append(InterpretRequest(p, layer, t, key=(p[:5], layer, t)))
    return reqs


def assert_matches(ours, ref):
    assert len(ours) == len(ref)
    for x, y in zip(ours, ref):
        assert x.key == y.key
        assert x.token_ids == y.token_ids, (x.key, x.text, y.text)
        assert max((abs(p - q) for p, q in zip(x.relevancy, y.relevancy)), default=0.0) <= TOL, x.key




@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("k", [1, 2])
def test_family_matches_reference(name, k, tokenizer):
    model = tiny(name, tokenizer)
    adapter = get_adapter(model)
    layers = (0, 2, adapter.num_layers)
    reqs = requests(tokenizer, layers)
    template = InterpretationTemplate.preset("summarize", tokenizer)
    injection = InjectionConfig(k=k, mode="blend", strength=0.8) if k == 2 else InjectionConfig(k=k)
    ours = SelfieEngine(model, tokenizer).interpret(reqs, template=template, injection=injection, generation=GEN)
    ref = reference_interpret(model, tokenizer, reqs, template, injection, GEN)
    assert_matches(ours, ref)
    assert any(r.mean_relevancy > 1e-3 for r in ours)


def test_every_supported_family_is_tested(tokenizer):
    assert {tiny(name, tokenizer).config.model_type for name in BUILDERS} == set(FAMILIES)


def test_an_unsupported_family_names_the_supported_ones(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"OPTForCausalLM \(model_type 'opt'\) is not supported\. Supported families: "
                             r"LLaMA 2/3.*Mistral.*Qwen2/2\.5.*Qwen3.*Gemma 2.*Gemma 3.*Phi-3.*GPT-2.*GPT-NeoX"):
        SelfieEngine(model, tokenizer)


def test_sliding_window_families_say_why_they_decode_without_cuda_graphs(tokenizer):
    """Their sliding layers' cache is not preallocated, so the static (graph) steps never apply: said, not silent."""
    for name in BUILDERS:
        reason = SelfieEngine(tiny(name, tokenizer), tokenizer).graphs_off_reason
        sliding = name in ("mistral", "qwen2", "gemma2", "gemma3", "phi3")
        assert (reason is not None and "sliding-window layers" in reason) is sliding, name
