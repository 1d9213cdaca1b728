"""selfie_client.vectors: what the client makes of the caller's vectors before it uploads them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from selfie_client.vectors import as_array, npy_bytes


def test_wide_floats_and_integers_travel_as_float32():
    """Workers compute in float32 or narrower: a float64 array would double the upload for nothing."""
    wide = np.random.default_rng(0).standard_normal((3, 8))
    sent = np.load(io.BytesIO(npy_bytes(as_array(wide))), allow_pickle=False)
    assert sent.dtype == np.float32 and np.array_equal(sent, wide.astype(np.float32))
    assert as_array([[1, 2, 3]]).dtype == np.float32
    assert as_array(np.ones(4, dtype=np.float16)).dtype == np.float16  # narrower stays as it is
    assert as_array(torch.ones(2, 4, dtype=torch.bfloat16)).dtype == np.float32


@pytest.mark.parametrize("value", [1e39, np.inf, np.nan])
def test_values_float32_cannot_hold_are_sent_as_they_are_for_the_service_to_refuse(value):
    wide = np.zeros((2, 8))
    wide[1, 3] = value
    sent = as_array(wide)
    assert sent.dtype == np.float64 and (np.isnan(sent[1, 3]) if np.isnan(value) else sent[1, 3] == value)
