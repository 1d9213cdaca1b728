"""One DataFrame shape for the engine and the client: `to_dataframe`'s columns, vectors labelled, and
`layer_token_table` reading the engine's frame as it reads the client's."""

import pandas as pd
import pytest

from selfie_client import layer_token_table
from selfie_client.client import RESULT_COLUMNS
from selfie_core import GenerationConfig, InterpretRequest, VectorRequest, to_dataframe
from selfie_core.frame import COLUMNS

GEN = GenerationConfig(max_new_tokens=3)
PROMPTS = ["The Eiffel Tower is located in Paris.", "A quick fox."]


def test_engine_and_client_share_the_columns():
    assert COLUMNS == RESULT_COLUMNS


def test_engine_frame_has_the_shared_shape_and_feeds_the_table(engine, tokenizer):
    lasts = [len(tokenizer(p).input_ids) - 1 for p in PROMPTS]
    reqs = [InterpretRequest(p, layer, token, key=(i, layer, token))
            for i, p in enumerate(PROMPTS) for layer in (1, 3) for token in (0, lasts[i])]
    results = engine.interpret(reqs, generation=GEN)
    vector = engine.interpret_vectors([VectorRequest([0.5] * engine.hidden_size, key="v", label="half")], generation=GEN)
    df = to_dataframe(results + vector)
    assert list(df.columns) == COLUMNS + ["key"]
    prompts = df[df["label"].isna()]
    assert list(prompts["prompt_index"]) == [0] * 4 + [1] * 4
    assert list(prompts["prompt"]) == [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    row = df.iloc[-1]  # the vector: its label in `label`, no prompt, no position
    assert row["label"] == "half" and pd.isna(row["prompt"])
    assert pd.isna(row["prompt_index"]) and pd.isna(row["layer"]) and pd.isna(row["token"])
    assert str(df["layer"].dtype) == "Int64"

    table = layer_token_table(df, 1)  # raised KeyError 'prompt_index' on the engine's frame before
    assert list(table.index) == [1, 3]
    assert [c.split(":")[0] for c in table.columns] == ["0", str(lasts[1])]
    text = " ".join(df[(df.prompt_index == 1) & (df.layer == 3) & (df.token == 0)]["text"].iloc[0].split())
    assert table.loc[3].iloc[0] == ((text if len(text) <= 28 else text[:27] + "…") or "(blank)")


def test_a_frame_of_vectors_only_is_refused_with_the_columns_to_read(engine):
    """`Client.interpret_vectors` returns one row per vector in the vectors kind's columns (no prompt_index, layer
    or token) and the engine's frame of vectors has no layer in any row: neither has a layer x token table, and the
    table said so with a KeyError 'prompt_index' (the client's frame) or an empty frame (the engine's)."""
    service = pd.DataFrame([[0, "probe", 3.2, "Paris", 0.4, [0.4], [42], "w", "m", "t"]],
                           columns=["vector_index", "label", "norm", "text", "mean_relevancy", "relevancy",
                                    "token_ids", "worker", "model", "created_at"])
    vector = engine.interpret_vectors([VectorRequest([0.5] * engine.hidden_size, key="v", label="half")],
                                      generation=GEN)
    for df in (service, to_dataframe(vector)):
        with pytest.raises(ValueError, match=r"interpreted vectors.*df\[\['label', 'text', 'mean_relevancy'\]\]"):
            layer_token_table(df)
