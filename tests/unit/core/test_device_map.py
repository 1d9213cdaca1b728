"""A model split by accelerate's ``device_map`` (blocks on the CPU and offloaded to disk) gives the single-device
engine's tokens and relevancy: the engine's hooks, skipped lower blocks and caches work through accelerate's
per-module wrappers, which move inputs and load offloaded weights."""

from __future__ import annotations

import copy

import pytest
import torch

from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest, SelfieEngine
from selfie_core import load_model

PROMPTS = ["The Eiffel Tower is located in Paris, the capital of France.", "Water is made of hydrogen"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, llama, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    copy.deepcopy(llama).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _requests(tokenizer):
    reqs = []
    for p in PROMPTS:
        n = len(tokenizer(p).input_ids)
        reqs += [InterpretRequest(p, layer, t, key=(p[:5], layer, t)) for layer in (0, 2, 4) for t in (1, n - 1)]
    return reqs


@pytest.mark.parametrize("k", [0, 2])
def test_blocks_split_between_cpu_and_disk_match_one_device(folder, tmp_path, tokenizer, k):
    # blocks 0 and 3 on the CPU; 1 and 2 offloaded to disk (their weights loaded only while they run)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    split = load_model(str(folder), device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert split.model.hf_device_map == device_map
    for i, offloaded in enumerate((False, True, True, False)):  # disk blocks hold no weights between forwards
        block = split.model.model.layers[i]
        assert ({str(p.device) for p in block.parameters()} == {"meta"}) is offloaded
    single = load_model(str(folder))
    template = InterpretationTemplate.preset("summarize", tokenizer)
    injection, generation = InjectionConfig(k=k), GenerationConfig(max_new_tokens=6)
    reqs = _requests(tokenizer)
    ours = SelfieEngine(split).interpret(reqs, template=template, injection=injection, generation=generation)
    ref = SelfieEngine(single).interpret(reqs, template=template, injection=injection, generation=generation)
    for x, y in zip(ours, ref, strict=True):
        assert x.token_ids == y.token_ids
        assert max((abs(a - b) for a, b in zip(x.relevancy, y.relevancy)), default=0.0) <= 1e-5
    assert any(r.mean_relevancy > 1e-3 for r in ours)


def test_a_split_or_offloaded_model_says_why_cuda_graphs_are_off(folder, tmp_path, llama, tokenizer):
    from selfie_core.engine import graphs_off_reason

    assert SelfieEngine(llama, tokenizer).graphs_off_reason is None
    offloaded = load_model(str(folder), device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                     "model.layers.1": "disk", "model.layers.2": "cpu",
                                                     "model.layers.3": "cpu", "model.norm": "cpu",
                                                     "model.rotary_emb": "cpu", "lm_head": "cpu"},
                           offload_folder=str(tmp_path / "offload"))
    assert "offloaded (e.g. model.layers.1" in SelfieEngine(offloaded).graphs_off_reason
    assert SelfieEngine(offloaded, cuda_graphs=False).graphs_off_reason is None
    # two execution devices: the reason names them (a meta-device copy, so that no second device is needed)
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    split = load_model(str(folder))
    add_hook_to_module(split.model.model.layers[3], AlignDevicesHook(execution_device="meta"))
    reason = graphs_off_reason(split.model, SelfieEngine(split).adapter)
    assert reason.startswith("its blocks compute on 2 devices (cpu, meta)")
