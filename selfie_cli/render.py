"""Terminal output through rich: layer x token tables (cells wrap, shaded by relevancy), progress bars, status lines."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

# The explorer's scale (api/static/common.js): white -> light blue -> deep blue as relevancy rises.
_WHITE, _MID, _DEEP = (255, 255, 255), (107, 174, 214), (8, 48, 107)


def relevancy_color(t: float) -> tuple[int, int, int]:
    """The background for relevancy `t` in [0, 1] of the table's scale (the explorer grid's colors)."""
    t = min(1.0, max(0.0, t))
    c0, c1, u = (_WHITE, _MID, t / 0.5) if t < 0.5 else (_MID, _DEEP, (t - 0.5) / 0.5)
    return tuple(round(a + (b - a) * u) for a, b in zip(c0, c1, strict=True))  # type: ignore[return-value]


def console(file: Any = None):
    """A rich console on stdout; a wide one when stdout is not a terminal, so piped tables wrap only long cells."""
    from rich.console import Console

    file = file or sys.stdout
    return Console(file=file, width=None if file.isatty() else 200, highlight=False, soft_wrap=False)


def layer_token_rich_table(df, prompt_index: int = 0, *, width: int = 24, relevancy: bool = True,
                           shade: bool = True):
    """One prompt's interpretations as a rich Table: layers down, "index:token" across, each cell the text
    (wrapped to `width`, never cut), its mean relevancy under it and its background shaded by it."""
    from rich.table import Table
    from rich.text import Text

    part = df[(df["prompt_index"] == prompt_index).fillna(False).astype(bool)]  # a vector's row has no prompt
    if part.empty:
        return None
    tokens = sorted(set(part["token"]))
    layers = sorted(set(part["layer"]))
    labels = {t: f"{t}:{s.strip() or repr(s)}" for t, s in zip(part["token"], part["source_token"], strict=True)}
    cells = {(r.layer, r.token): r for r in part.itertuples(index=False)}
    scale = max(1e-9, float(part["mean_relevancy"].max()))
    grounding = "grounded" in part.columns and bool((part["grounded"] == False).any())  # noqa: E712 - NA is not False
    caption = [f"under each text its mean relevancy; shading 0..{scale:.3f}"] if relevancy else []
    if grounding:
        caption.append("struck through: not grounded (as the baseline, repetition, empty or low relevancy)")
    table = Table(show_lines=True, header_style="bold", caption="; ".join(caption) or None)
    table.add_column("layer", justify="right", no_wrap=True)
    for t in tokens:
        table.add_column(labels[t], min_width=min(len(labels[t]), width), max_width=max(width, len(labels[t])),
                         overflow="fold")
    for layer in layers:
        row: list[Any] = [str(layer)]
        for t in tokens:
            r = cells.get((layer, t))
            if r is None:
                row.append("")
                continue
            text = " ".join(str(r.text).split()) or "(blank)"  # an empty generation, not a missing cell
            ungrounded = getattr(r, "grounded", None) is False
            cell = Text(text, style="strike" if ungrounded else "")
            if relevancy:
                cell.append(f"\n{r.mean_relevancy:.3f}", style="italic")
            if ungrounded:
                cell.append(f"\nnot grounded: {r.ungrounded_reason}", style="bold")
            if shade:
                v = r.mean_relevancy / scale
                red, green, blue = relevancy_color(v)
                cell.stylize(f"{'white' if v > 0.55 else 'black'} on rgb({red},{green},{blue})")
            row.append(cell)
        table.add_row(*row)
    return table


def print_table(df, prompt_index: int = 0, width: int = 24, *, relevancy: bool = True, shade: bool = True,
                file: Any = None) -> None:
    """Print one prompt's layer x token table (or a line saying it has none)."""
    out = console(file)
    table = layer_token_rich_table(df, prompt_index, width=width, relevancy=relevancy, shade=shade)
    if table is None:
        out.print(f"(no interpretations for prompt {prompt_index})")
    else:
        out.print(table)


def print_baseline(status: dict[str, Any], out: Any) -> None:
    """The job's baseline, the interpretation prompt's own output, above its tables (nothing for older jobs)."""
    baseline = status.get("baseline")
    if baseline:
        out.print(f"baseline (nothing injected): {' '.join(str(baseline['text']).split()) or '(blank)'}", markup=False)


@contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr: `update(done=..., total=..., status=...)`; nothing drawn when disabled."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[status]}"), console=Console(stderr=True), disable=not enabled,
                        transient=False)
    with progress:
        task = progress.add_task(description, total=total, status="")

        def update(done: int | None = None, total: int | None = None, status: str | None = None,
                   advance: int | None = None) -> None:
            fields: dict[str, Any] = {}
            if status is not None:
                fields["status"] = status
            progress.update(task, completed=done, total=total, advance=advance, **fields)

        yield update


def rows_rich_table(df, *, width: int = 48, shade: bool = True):
    """The results of a job of another kind than interpret as a rich Table, one row per result (a vectors job:
    index, label, norm, mean relevancy, text): long texts and labels wrap within `width` columns, never cut."""
    from rich.table import Table
    from rich.text import Text

    if "model_tokens" in df.columns:  # a lenses job: each lens's top-1 token and its probability
        df = lens_top1(df)
    shown = [c for c in ("vector_index", "label", "norm", "mean_relevancy", "text") if c in df.columns]
    columns = shown or [str(c) for c in df.columns]
    scale = max(1e-9, float(df["mean_relevancy"].max())) if "mean_relevancy" in df.columns else 1.0
    table = Table(show_lines=False, header_style="bold")
    for column in columns:
        numeric = column in ("vector_index", "norm", "mean_relevancy")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=numeric,
                         max_width=None if numeric else width, overflow="fold")
    for record in df[columns].itertuples(index=False):
        cells: list[Any] = []
        for column, value in zip(columns, record, strict=True):
            if column == "text":
                cells.append(" ".join(str(value).split()) or "(blank)")
            elif isinstance(value, float):
                cell = Text(f"{value:.4g}")
                if column == "mean_relevancy" and shade and value == value:  # NaN: no shade
                    v = value / scale
                    red, green, blue = relevancy_color(v)
                    cell.stylize(f"{'white' if v > 0.55 else 'black'} on rgb({red},{green},{blue})")
                cells.append(cell)
            else:
                cells.append("" if value is None else str(value))
        table.add_row(*cells)
    return table


def print_rows(df, width: int = 48, *, shade: bool = True, file: Any = None) -> None:
    """Print the results of a job of another kind than interpret (see `rows_rich_table`)."""
    out = console(file)
    if df.empty:
        out.print("(no results)")
        return
    out.print(rows_rich_table(df, width=width, shade=shade))


def lens_top1(df):
    """prompt_index, layer, token, source_token, then per lens (model, logit, identity) its top-1 token and
    probability ("'Paris' 0.82"); a lens the job did not run is blank."""
    part = df[["prompt_index", "layer", "token", "source_token"]].copy()
    for lens in ("model", "logit", "identity"):
        part[lens] = [f"{tokens[0]!r} {probs[0]:.2f}" if isinstance(tokens, list) and tokens else ""
                      for tokens, probs in zip(df[f"{lens}_tokens"], df[f"{lens}_probs"])]
    return part


def print_search(df, width: int = 60, *, file: Any = None) -> None:
    """The search hits as a rich table, newest first: when (UTC), kind, model, job, where (layer:token or the
    vector's index and label), mean relevancy and the text, wrapped within `width` columns instead of cut."""
    from rich.table import Table

    out = console(file)
    if df.empty:
        out.print("(no results)")
        return
    table = Table(header_style="bold", show_lines=False)
    for name, options in (("when (UTC)", {"no_wrap": True}), ("kind", {"no_wrap": True}),
                          ("model", {"max_width": 24, "overflow": "fold"}), ("job", {"no_wrap": True}),
                          ("where", {"max_width": 24, "overflow": "fold"}),
                          ("relevancy", {"justify": "right", "no_wrap": True}),
                          ("text", {"max_width": width, "overflow": "fold"})):
        table.add_column(name, **options)
    for hit in df.itertuples(index=False):
        when = str(hit.created_at)[:19].replace("T", " ")
        if hit.kind == "interpret":
            where = f"layer {int(hit.layer)}, token {int(hit.token)}"
        else:
            where = f"vector {int(hit.vector_index)}" + (f" ({hit.label})" if isinstance(hit.label, str) else "")
        text = " ".join(str(hit.text).split()) or "(blank)"
        table.add_row(when, hit.kind, hit.model, hit.job_id, where, f"{hit.mean_relevancy:.3f}", text)
    out.print(table)


def status_line(status: dict[str, Any]) -> str:
    p = status["progress"]
    parts = [f"job {status['id']}", status["state"], f"{p['done']}/{p['total']} ({100 * p['fraction']:.0f}%)"]
    edit = status.get("edit")
    if edit:  # an edit's one result is the whole edit: its epochs say how far it is
        parts[2] = f"epoch {edit['epochs_done']}/{edit['epochs_total']}"
        if status["state"] == "running" and edit["epochs_done"] >= edit["epochs_total"]:
            parts.append("evaluating the base model and the variant")
    spec = status.get("spec") or {}
    if spec.get("variant"):
        parts.append(f"on variant {spec['variant']}")
    if status.get("queue_position"):
        parts.append(f"{status['queue_position']} chunks ahead")
    if status.get("waiting"):
        parts.append(status["waiting"])
    timings = status.get("timings") or {}
    if timings.get("total_seconds") is not None:
        parts.append(f"{timings['total_seconds']:.1f}s")
    if status.get("error"):
        parts.append(f"error: {status['error']}")
    return "  ".join(parts)


def _figure(value: Any, share: bool = False) -> str:
    if value is None:
        return "n/a"
    if share:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def evaluation_lines(evaluations: dict[str, Any]) -> list[str]:
    """An edit's evaluations as 'what: base -> variant' lines (the variant page's before/after table, in text)."""
    lines: list[str] = []
    objective = evaluations.get("objective")
    if objective:
        share = objective.get("name") == "bad_share"
        what = "judged bad (share of positions)" if share else "source state's distance to the target"
        lines.append(f"{what}: {_figure(objective.get('base'), share)} -> {_figure(objective.get('variant'), share)}")
    interpretation = evaluations.get("interpretation")
    if interpretation:
        lines.append(f"interpretation of layer {interpretation['layer']}, token {interpretation['token']}:")
        lines.append(f"  base:    {interpretation.get('base')!r}")
        lines.append(f"  variant: {interpretation.get('variant')!r}")
        if interpretation.get("target") is not None:
            lines.append(f"  target:  {interpretation['target']!r}")
    answer = evaluations.get("answer")
    if answer:
        lines.append("greedy answer to the source prompt:")
        lines.append(f"  base:    {answer.get('base')!r}")
        lines.append(f"  variant: {answer.get('variant')!r}")
    knowledge = evaluations.get("knowledge")
    if knowledge:
        lines.append(f"knowledge: the base model answers {knowledge['known']} of {knowledge['facts']} facts; the variant "
                     f"keeps {_figure(knowledge.get('kept_of_known'), True)} of those "
                     f"(accuracy {_figure(knowledge.get('base_accuracy'), True)} -> "
                     f"{_figure(knowledge.get('edited_accuracy'), True)})")
    behaviour = evaluations.get("behaviour")
    if behaviour:
        base, variant = behaviour.get("base") or {}, behaviour.get("variant") or {}
        lines.append(f"harmful behaviour ({behaviour['requests']} requests, flagged by {behaviour['detector']}): "
                     f"plain {_figure(base.get('plain_hit_rate'), True)} -> {_figure(variant.get('plain_hit_rate'), True)}, "
                     f"with the injection {_figure(base.get('injected_hit_rate'), True)} -> "
                     f"{_figure(variant.get('injected_hit_rate'), True)}")
    return lines
