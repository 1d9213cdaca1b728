"""Results as a pandas DataFrame for notebook users: the one shape the engine and the service's client share.

Columns, in this order (`selfie_client.client.RESULT_COLUMNS` is the same list; a test holds them equal):

- `prompt_index`: the prompt's position among the distinct prompts (the job's prompt index in the service; here
  the order in which prompts first appear in the results); empty (<NA>) for a vector's row.
- `prompt`: the prompt's text; empty (None) for a vector's row.
- `label`: a vector's label (VectorRequest.label, or ""); empty (None) for a prompt's row.
- `layer`, `token`: hidden_states index and token index of the interpreted state; <NA> for a vector's row.
- `source_token`: the prompt's token at `token`, as text.
- `text`, `mean_relevancy`, `relevancy`, `token_ids`: the interpretation, its relevancy per generated token and
  their mean, and the generated ids.
- `grounded`, `ungrounded_reason`: whether the text is grounded in the injected state, and why not
  (`selfie_core.grounding`).

After these each side adds its own: the engine `key` (the caller's request key), the client `worker`, `model` and
`created_at`.
"""

from __future__ import annotations

from typing import Iterable

from .records import Interpretation

COLUMNS = ["prompt_index", "prompt", "label", "layer", "token", "source_token", "text", "mean_relevancy",
           "grounded", "ungrounded_reason", "relevancy", "token_ids"]
INTEGER_COLUMNS = ("prompt_index", "layer", "token")


def to_dataframe(results: Iterable[Interpretation]):
    import pandas as pd

    rows = []
    prompt_indices: dict[str, int] = {}
    for r in results:
        row = r.to_dict() if isinstance(r, Interpretation) else dict(r)
        if isinstance(r, Interpretation):
            row["key"] = r.key
        if row.get("layer") is None and row.get("token") is None:  # a vector: the record's prompt is its label
            row["label"], row["prompt"], row["prompt_index"] = row.get("prompt") or "", None, None
        else:
            row["label"] = None
            row["prompt_index"] = prompt_indices.setdefault(row["prompt"], len(prompt_indices))
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS + ["key"])
    for column in INTEGER_COLUMNS:  # nullable integers: a vector's row has none, the others stay ints
        df[column] = df[column].astype("Int64")
    df["grounded"] = df["grounded"].astype("boolean")
    return df
