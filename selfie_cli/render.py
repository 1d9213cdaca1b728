"""Terminal output: layer x token tables, job status lines."""

from __future__ import annotations

from typing import Any

import click


def print_table(df, prompt_index: int = 0, width: int = 24) -> None:
    """A layer x token table of one prompt's interpretations."""
    import pandas as pd

    from selfie_client.tables import layer_token_table

    table = layer_token_table(df, prompt_index, width=width)
    if table.empty:
        click.echo(f"(no interpretations for prompt {prompt_index})")
        return
    with pd.option_context("display.max_columns", None, "display.width", 10_000, "display.max_colwidth", width + 2,
                           "display.max_rows", 10_000):
        click.echo(table.to_string())


def status_line(status: dict[str, Any]) -> str:
    p = status["progress"]
    parts = [f"job {status['id']}", status["state"], f"{p['done']}/{p['total']} ({100 * p['fraction']:.0f}%)"]
    if status.get("queue_position"):
        parts.append(f"{status['queue_position']} chunks ahead")
    timings = status.get("timings") or {}
    if timings.get("total_seconds") is not None:
        parts.append(f"{timings['total_seconds']:.1f}s")
    if status.get("error"):
        parts.append(f"error: {status['error']}")
    return "  ".join(parts)
