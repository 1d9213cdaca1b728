"""The CPU thread rule of `selfie worker` / `selfie interpret` and its setter."""

import pytest
import torch

from selfie_core.threads import MAX_DEFAULT_THREADS, default_threads, set_threads, usable_cores


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (64, MAX_DEFAULT_THREADS)])
def test_default_leaves_half_the_cores(cores, threads):
    assert default_threads(cores) == threads


def test_set_threads_sets_torch_and_says_so():
    assert set_threads(2) == 2 == torch.get_num_threads()
    assert set_threads(None) == default_threads(usable_cores()) == torch.get_num_threads()
    with pytest.raises(ValueError, match="at least 1"):
        set_threads(0)
