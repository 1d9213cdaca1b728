"""Layer x token tables of interpretations, for terminals and notebooks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def layer_token_table(df: pd.DataFrame, prompt_index: int = 0, *, width: int | None = 28) -> pd.DataFrame:
    """Rows: layers; columns: "index:token" of the prompt; cells: the interpretation text (cut to `width`).

    Takes the results of the client (`Client.results`, `Client.interpret`) and of the engine
    (`selfie_core.to_dataframe`) alike: both have the same columns. Interpreted vectors have no layer or token,
    so a frame of vectors only (`Client.interpret_vectors`, `Client.rows` of a vectors job) is refused with a
    ValueError that says which columns to read instead of a KeyError or an empty table."""
    import pandas as pd

    if "layer" not in df.columns or ("prompt_index" in df.columns and df["prompt_index"].isna().all()):
        raise ValueError("these are interpreted vectors (one row per vector, no layer or token): read "
                         "df[['label', 'text', 'mean_relevancy']] instead of a layer x token table")
    part = df[(df["prompt_index"] == prompt_index).fillna(False).astype(bool)]  # a vector's row has no prompt
    if part.empty:
        return pd.DataFrame()
    labels = {t: f"{t}:{s.strip() or repr(s)}" for t, s in zip(part["token"], part["source_token"], strict=True)}
    texts = part["text"].astype(str).str.replace(r"\s+", " ", regex=True).str.strip()
    texts = texts.mask(texts == "", "(blank)")  # an empty generation, not a missing cell
    if width:
        texts = texts.map(lambda s: s if len(s) <= width else s[: width - 1] + "…")
    table = part.assign(text=texts).pivot_table(index="layer", columns="token", values="text", aggfunc="first")
    table = table.reindex(sorted(table.columns), axis=1)
    table.columns = [labels[t] for t in table.columns]
    table.index.name = "layer"
    return table.fillna("")
