import json
import math
import re
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
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(do_sample=1)}, "do_sample must be True or False"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(seed=2**200)}, "fits in 64 bits"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(seed=1.5)}, "seed"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(eos_token_ids=("x",))}, "eos_token_ids"),
    ([InterpretRequest(P, 1, 0)], {"generation": GenerationConfig(eos_token_ids=5)}, "eos_token_ids"),
    ([InterpretRequest(P, 1, 0)], {"generation": {"max_tokens": 5}}, "GenerationConfig has no field 'max_tokens'"),
    ([InterpretRequest(P, 1, 0)], {"injection": {"k": 1, "layer": 2}}, "InjectionConfig has no field 'layer'"),
    ([InterpretRequest(P, 1, 0)], {"template": "summarize", "batch_size": 0}, "batch_size must be"),
    ([InterpretRequest(P, 1, 0)], {"batch_size": -1}, "batch_size must be"),
    ([VectorRequest(torch.zeros(63))], {}, r"shape \(63,\), expected \(64,\)"),
    ([VectorRequest([math.nan] * 64)], {}, "NaN or infinite"),
    ([VectorRequest(torch.full((64,), math.inf))], {}, "NaN or infinite"),
    ([VectorRequest("abc")], {}, "not numeric"),
    ([InterpretRequest(P, 1, 0), "junk"], {}, "request 1"),
    (InterpretRequest(P, 1, 0), {}, "list of requests"),
])
def test_validation_errors(engine, requests, kwargs, message):
    if "batch_size" not in kwargs:  # a run's option, not part of what validate() checks
        with pytest.raises(SelfieInputError, match=message):
            engine.validate(requests, **kwargs)
    with pytest.raises(SelfieInputError, match=message):
        engine.interpret(requests, **kwargs)
    assert issubclass(SelfieInputError, ValueError)


def test_valid_requests_pass(engine, tokenizer):
    n = len(tokenizer(P).input_ids)
    engine.validate([InterpretRequest(P, 0, 0), InterpretRequest(P, 4, n - 1), VectorRequest([0.5] * 64)],
                    injection=InjectionConfig(k=3), generation=GenerationConfig(max_new_tokens=5, do_sample=True,
                                                                                 temperature=0.7, top_p=1.0))
    engine.validate([], template="describe")


def test_an_engine_batch_size_below_one_is_refused(llama, tokenizer):
    from selfie_core import SelfieEngine

    for size in (0, -4, 2.5, True):
        with pytest.raises(SelfieInputError, match="batch_size must be"):
            SelfieEngine(llama, tokenizer, batch_size=size)


def test_greedy_decoding_ignores_the_sampling_settings(engine):
    requests = [InterpretRequest(P, 2, 3)]
    plain = engine.interpret(requests, generation=GenerationConfig(max_new_tokens=3))
    loose = engine.interpret(requests, generation=GenerationConfig(max_new_tokens=3, temperature=None, top_p=None))
    assert [r.token_ids for r in loose] == [r.token_ids for r in plain]


def test_unseeded_sampling_leaves_torchs_global_generator_alone(engine):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    engine.interpret([InterpretRequest(P, 2, 3)], generation=GenerationConfig(max_new_tokens=3, do_sample=True))
    assert torch.equal(torch.rand(3), expected)


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
    """Importing selfie_core imports no service package and reads no environment variable of its own."""
    root = Path(__file__).resolve().parents[3]
    code = (
        "import os, sys\n"
        "from collections.abc import MutableMapping\n"
        "import torch, transformers  # their own reads of the environment are theirs\n"
        "readers = []\n"
        "class Recording(MutableMapping):\n"
        "    def __init__(self, env): self.env = env\n"
        "    def _seen(self):\n"
        "        frame = sys._getframe(2)\n"
        "        while frame.f_code.co_filename.endswith(('_collections_abc.py', '_collections_abc>', '/os.py', ' os>')):\n"
        "            frame = frame.f_back\n"
        "        readers.append(frame.f_code.co_filename)\n"
        "    def __getitem__(self, key): self._seen(); return self.env[key]\n"
        "    def __contains__(self, key): self._seen(); return key in self.env\n"
        "    def __setitem__(self, key, value): self.env[key] = value\n"
        "    def __delitem__(self, key): del self.env[key]\n"
        "    def __iter__(self): return iter(self.env)\n"
        "    def __len__(self): return len(self.env)\n"
        "os.environ = Recording(os.environ)\n"
        "os.environ.get('PROBE')  # the recorder sees a read\n"
        "assert readers == ['<string>'], readers\n"
        "import selfie_core, selfie_core.engine, selfie_core.triton_attention, selfie_core.triton_norm\n"
        "own = [r for r in readers if 'selfie_core' in r]\n"
        "assert not own, own\n"
        "bad = [m for m in ('celery', 'sqlalchemy', 'pydantic_settings', 'selfie_jobs', 'workers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    for path in (root / "selfie_core").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\benviron\b|getenv", text), path
