import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfie_core import (GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest,
                         SelfieInputError, VectorRequest)

P = "The Eiffel Tower is located in Paris, the capital of France."


@pytest.mark.parametrize("requests, kwargs, message", [
    ([InterpretRequest(P, 5, 0)], {}, "layer 5 is out of range: use 0..4"),
    ([InterpretRequest(P, -1, 0)], {}, "layer -1 is out of range"),
    ([InterpretRequest(P, 1, 99)], {}, "token 99 is out of range"),
    ([InterpretRequest(P, 1, -1)], {}, "token -1 is out of range"),
    ([InterpretRequest("   ", 1, 0)], {}, "prompt is empty"),
    ([InterpretRequest("word " * 300, 1, 0)], {}, "longer than the model's context of 256"),
    ([InterpretRequest(P, 1, 0)], {"template": InterpretationTemplate(("no placeholder",))}, "no placeholders"),
    ([InterpretRequest(P, 1, 0)], {"injection": InjectionConfig(k=4)}, "k=4 is outside the model: use 0 <= k < 4"),
    ([InterpretRequest(P, 1, 0)], {"injection": InjectionConfig(k=-1)}, "outside the model"),
    ([InterpretRequest(P, 1, 0)], {"injection": InjectionConfig(mode="swap")}, "mode 'swap' is unknown"),
    ([InterpretRequest(P, 1, 0)], {"injection": InjectionConfig(mode="blend", strength=math.nan)}, "must be finite"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(max_new_tokens=0)}, "max_new_tokens"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(max_new_tokens=100000)}, "max_new_tokens"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(max_new_tokens=250)}, "exceeds the model's context"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(do_sample=True, temperature=0.0)}, "temperature"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(do_sample=True, top_p=0.0)}, "top_p"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(do_sample=True, top_p=1.5)}, "top_p"),
    ([VectorRequest(torch.zeros(63))], {}, r"shape \(63,\), expected \(64,\)"),
    ([VectorRequest([math.nan] * 64)], {}, "NaN or infinite"),
    ([VectorRequest(torch.full((64,), math.inf))], {}, "NaN or infinite"),
    ([VectorRequest("abc")], {}, "not numeric"),
    ([InterpretRequest(P, 1, 0), "junk"], {}, "request 1"),
    (InterpretRequest(P, 1, 0), {}, "list of requests"),
])
def test_validation_errors(engine, requests, kwargs, message):
    with pytest.raises(SelfieInputError, match=message):
        engine.validate(requests, **kwargs)
    with pytest.raises(SelfieInputError):
        engine.interpret(requests, **kwargs)
    assert issubclass(SelfieInputError, ValueError)


def test_valid_requests_pass(engine, tokenizer):
    n = len(tokenizer(P).input_ids)
    engine.validate([InterpretRequest(P, 0, 0), InterpretRequest(P, 4, n - 1), VectorRequest([0.5] * 64)],
                    injection=InjectionConfig(k=3), generation=GenerationConfig(max_new_tokens=5, do_sample=True,
                                                                                 temperature=0.7, top_p=1.0))
    engine.validate([], template="describe")


def test_model_card_is_json_and_tokenizes_like_the_engine(engine, tokenizer):
    from tokenizers import Tokenizer

    card = json.loads(json.dumps(engine.model_card()))
    assert card["name"] == "tiny-llama" and card["architecture"] == "LlamaForCausalLM"
    assert card["num_layers"] == 4 and card["hidden_size"] == 64 and card["max_context"] == 256
    assert card["vocab_size"] == len(tokenizer) and card["eos_token_id"] == tokenizer.eos_token_id
    assert card["bos_token_id"] == tokenizer.bos_token_id and card["chat_template"]
    backend = Tokenizer.from_str(card["tokenizer_json"])
    for prompt in [P, "A quick fox.", "  spaces  and\nnewlines", "émoji 🙂 ünïcode"]:
        assert backend.encode(prompt).ids == tokenizer(prompt).input_ids


def test_gpt2_card(gpt2, tokenizer):
    from selfie_core import SelfieEngine

    card = SelfieEngine(gpt2, tokenizer).model_card()
    assert card["num_layers"] == 3 and card["max_context"] == 256 and card["layout"] == "gpt2"


def test_import_has_no_side_effects():
    root = Path(__file__).resolve().parents[3]
    code = (
        "import os, sys\n"
        "reads = []\n"
        "orig = os.environ.__class__.__getitem__\n"
        "import selfie_core\n"
        "bad = [m for m in ('celery', 'sqlalchemy', 'pydantic_settings', 'selfie_jobs', 'workers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    for path in (root / "selfie_core").glob("*.py"):
        text = path.read_text()
        assert "os.environ" not in text and "getenv" not in text, path
