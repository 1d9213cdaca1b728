import copy

import pytest
import torch

from selfie_core import LoadedModel, SelfieEngine, load_model
from selfie_core.loading import _dtype


def test_local_folder_loads_with_dtype(tmp_path, llama, tokenizer):
    copy.deepcopy(llama).to(torch.float32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="bfloat16")
    assert isinstance(loaded, LoadedModel) and loaded.dtype == "bfloat16" and loaded.device == "cpu"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16 and not loaded.model.training
    assert loaded.tokenizer("A fox.").input_ids == tokenizer("A fox.").input_ids
    card = SelfieEngine(loaded).model_card()
    assert card["name"] == str(tmp_path) and card["dtype"] == "bfloat16"


def test_bad_dtype():
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        _dtype("int8")
    assert _dtype("torch.float16") is torch.float16


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-model"])
def test_a_missing_local_folder_is_named_not_taken_for_a_hub_id(path):
    with pytest.raises(FileNotFoundError, match=f"no model folder at {path}"):
        load_model(path)
