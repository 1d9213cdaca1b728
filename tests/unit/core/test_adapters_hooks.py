import pytest
import torch

from selfie_core import UnsupportedArchitectureError
from selfie_core.adapters import get_adapter
from selfie_core.hooks import apply_injection, inject


def test_layouts(llama, gpt2, neox):
    assert get_adapter(llama).layout == "llama" and get_adapter(llama).num_layers == 4
    assert get_adapter(gpt2).layout == "gpt2" and get_adapter(gpt2).num_layers == 3
    assert get_adapter(neox).layout == "gpt_neox" and get_adapter(neox).num_layers == 3


def test_unknown_architecture_names_what_is_missing():
    with pytest.raises(UnsupportedArchitectureError, match="Linear is not a Hugging Face causal LM.*Supported "
                                                           "families: LLaMA 2/3.*GPT-NeoX"):
        get_adapter(torch.nn.Linear(2, 2))


def test_modes():
    h = torch.ones(2, 4, 3)
    v = torch.full((2, 3), 5.0)
    assert torch.equal(apply_injection(h, [1, 2], v, "replace", 1.0)[:, 1:3], torch.full((2, 2, 3), 5.0))
    blended = apply_injection(h, [1], v, "blend", 0.25)
    assert torch.allclose(blended[:, 1], torch.full((2, 3), 0.25 * 5 + 0.75))
    added = apply_injection(h, [3], v, "add", 2.0)
    assert torch.allclose(added[:, 3], torch.full((2, 3), 11.0)) and torch.equal(added[:, :3], h[:, :3])
    assert torch.equal(h, torch.ones(2, 4, 3))  # input untouched


def test_hook_fires_once_and_is_removed_on_error(llama):
    block = get_adapter(llama).blocks[1]
    seen = []
    ids = torch.tensor([[1, 5, 6, 7]])
    vec = torch.randn(1, 64, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="boom"):
        with inject(block, [2], vec) as hook:
            probe = block.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].clone()), with_kwargs=True)
            try:
                llama(ids)
                llama(ids)
            finally:
                probe.remove()
            raise RuntimeError("boom")
    assert hook.calls == 2
    assert len(block._forward_pre_hooks) == 0
    assert torch.equal(seen[0][0, 2], vec[0])  # first forward (prefill) injected
    assert not torch.equal(seen[1][0, 2], vec[0])  # later forwards pass through
    assert torch.equal(seen[0][0, 1], seen[1][0, 1])  # other positions untouched
