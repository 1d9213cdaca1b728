"""The preallocated KV cache holds exactly what a growing ``DynamicCache`` holds."""

import pytest
import torch
from transformers import DynamicCache

from selfie_core.modelcall import PreallocatedLayer, make_cache, select_rows


def _prompt_kv(layers=2, heads=3, length=5, dim=4):
    torch.manual_seed(0)
    return [(torch.randn(1, heads, length, dim), torch.randn(1, heads, length, dim)) for _ in range(layers)]


def test_preallocated_cache_equals_dynamic_cache(llama):
    kv = _prompt_kv()
    ours = make_cache(llama, kv, batch=4, upto=3, capacity=9)
    plain = make_cache(llama, kv, batch=4, upto=3)
    assert all(isinstance(layer, PreallocatedLayer) for layer in ours.layers)
    assert not any(isinstance(layer, PreallocatedLayer) for layer in plain.layers)
    for step in range(6):
        if step == 2:  # rows leave the batch, as at EOS
            keep = torch.tensor([0, 2, 3])
            select_rows(ours, keep)
            select_rows(plain, keep)
        if step == 4:  # the same through the Cache API
            ours.batch_select_indices(torch.tensor([0, 2]))
            plain.batch_select_indices(torch.tensor([0, 2]))
        rows = ours.layers[0].keys.shape[0]
        new = [(torch.randn(rows, 3, 1, 4), torch.randn(rows, 3, 1, 4)) for _ in kv]
        for i, (k, v) in enumerate(new):
            got = ours.update(k, v, i)
            want = plain.update(k, v, i)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == plain.get_seq_length() == 3 + step + 1
    with pytest.raises(RuntimeError, match="capacity 9 exceeded"):
        ours.update(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4), 0)


def test_cache_without_prefix_starts_empty(llama):
    cache = make_cache(llama, _prompt_kv(), batch=2, upto=0, capacity=4)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 0
