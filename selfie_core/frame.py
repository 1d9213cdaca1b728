"""Results as a pandas DataFrame for notebook users."""

from __future__ import annotations

from typing import Iterable

from .records import Interpretation

COLUMNS = ["key", "prompt", "layer", "token", "source_token", "text", "mean_relevancy", "relevancy", "token_ids"]


def to_dataframe(results: Iterable[Interpretation]):
    import pandas as pd

    rows = []
    for r in results:
        if isinstance(r, Interpretation):
            row = r.to_dict()
            row["key"] = r.key
        else:
            row = dict(r)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)
