"""The vectors runner's norm: the norm stored with each result is the interpreted vector's, also past float32's
range of squares."""

from __future__ import annotations

import math

import torch

from workers.runners.vectors import vector_norm


def test_norm_of_a_large_finite_vector_is_finite():
    # 576 values of 1e20 (SmolLM2's hidden size): each square (1e40) overflows float32, the norm (2.4e21) does not
    vector = torch.full((576,), 1e20, dtype=torch.float32)
    assert math.isclose(vector_norm(vector), 1e20 * math.sqrt(576), rel_tol=1e-6)


def test_norm_of_an_ordinary_vector():
    assert vector_norm(torch.tensor([3.0, 4.0])) == 5.0
    assert vector_norm(torch.zeros(8)) == 0.0
