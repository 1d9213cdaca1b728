"""The CLI's rich tables: long interpretations wrap instead of being cut, relevancy is printed and shades cells."""

from __future__ import annotations

import io

import pandas as pd

from selfie_cli.render import layer_token_rich_table, print_rows, print_table, relevancy_color, rows_rich_table

LONG = "the capital city of France, famous for the Eiffel Tower and the Louvre museum"


def frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"prompt_index": 0, "layer": 2, "token": 5, "source_token": " Paris", "text": LONG, "mean_relevancy": 0.4},
        {"prompt_index": 0, "layer": 6, "token": 5, "source_token": " Paris", "text": "a city", "mean_relevancy": 0.1},
        {"prompt_index": 0, "layer": 2, "token": 6, "source_token": ".", "text": "", "mean_relevancy": 0.0},
        {"prompt_index": 1, "layer": 2, "token": 0, "source_token": "x", "text": "other", "mean_relevancy": 0.2},
    ])


def rendered(**options) -> str:
    buffer = io.StringIO()
    print_table(frame(), 0, width=16, file=buffer, **options)
    return buffer.getvalue()


def test_long_cells_wrap_and_keep_every_word():
    text = rendered()
    for word in LONG.replace(",", "").split():
        assert word in text, word
    assert "…" not in text
    assert "5:Paris" in text and "6:." in text and "(blank)" in text and "other" not in text
    assert max(len(line) for line in text.splitlines()) < 80  # narrow columns: the long text took several lines


def test_relevancy_is_printed_and_can_be_left_out():
    assert "0.400" in rendered() and "0.100" in rendered()
    assert "0.400" not in rendered(relevancy=False)


def test_cells_are_shaded_by_relevancy_on_the_explorer_scale():
    table = layer_token_rich_table(frame(), 0, width=16)
    paris = table.columns[1]._cells  # layer rows 2, 6
    styles = [str(span.style) for span in paris[0].spans]
    assert any("on rgb(8,48,107)" in s for s in styles)  # the table's highest relevancy: the deepest blue
    assert relevancy_color(0) == (255, 255, 255) and relevancy_color(1) == (8, 48, 107)
    plain = layer_token_rich_table(frame(), 0, width=16, shade=False)
    assert not any("on rgb" in str(span.style) for span in plain.columns[1]._cells[0].spans)


def test_a_prompt_without_rows_says_so():
    buffer = io.StringIO()
    print_table(frame(), 7, file=buffer)
    assert buffer.getvalue().strip() == "(no interpretations for prompt 7)"


def vector_rows() -> pd.DataFrame:
    return pd.DataFrame([
        {"vector_index": 0, "label": "a probe direction for honesty, layer 12 of the chat model", "norm": 31.5,
         "mean_relevancy": 0.4, "text": LONG + " and the river Seine that runs through the middle of it"},
        {"vector_index": 1, "label": "b", "norm": float("nan"), "mean_relevancy": 0.1, "text": "  a\n city "},
    ])


def test_vector_rows_wrap_long_labels_and_texts_and_keep_every_word():
    buffer = io.StringIO()
    print_rows(vector_rows(), width=20, file=buffer)
    text = buffer.getvalue()
    for word in (LONG + " and the river Seine that runs through the middle of it").replace(",", "").split():
        assert word in text, word
    for word in ("probe", "direction", "honesty", "chat", "model"):
        assert word in text, word
    assert "…" not in text and "a city" in text and "31.5" in text
    assert max(len(line) for line in text.splitlines()) < 90  # the long cells took several lines


def test_vector_rows_are_shaded_by_mean_relevancy_unless_told_not_to():
    table = rows_rich_table(vector_rows(), width=20)
    relevancy = table.columns[3]._cells
    assert any("on rgb(8,48,107)" in str(span.style) for span in relevancy[0].spans)
    plain = rows_rich_table(vector_rows(), width=20, shade=False)
    assert not any("on rgb" in str(span.style) for span in plain.columns[3]._cells[0].spans)


def test_no_vector_rows_says_so():
    buffer = io.StringIO()
    print_rows(vector_rows().iloc[0:0], file=buffer)
    assert buffer.getvalue().strip() == "(no results)"


def test_search_hits_wrap_within_the_width_and_say_where_each_one_is():
    from selfie_cli.render import print_search

    hits = pd.DataFrame([
        {"kind": "interpret", "id": 1, "job_id": "a" * 32, "model": "smollm2", "created_at": "2026-11-30T18:49:54Z",
         "text": LONG, "mean_relevancy": 0.1234, "layer": 5, "token": 3, "vector_index": None, "label": None},
        {"kind": "vectors", "id": 2, "job_id": "b" * 32, "model": "smollm2", "created_at": "2026-11-30T18:49:55Z",
         "text": "a vector", "mean_relevancy": 0.5, "layer": None, "token": None, "vector_index": 0,
         "label": "probe"},
    ])
    buffer = io.StringIO()
    print_search(hits, width=20, file=buffer)
    text = buffer.getvalue()
    for word in LONG.replace(",", "").split():
        assert word in text, word
    assert "…" not in text and "None" not in text
    assert "layer 5, token 3" in text and "vector 0 (probe)" in text and "0.123" in text
    assert "2026-11-30 18:49:54" in text
    empty = io.StringIO()
    print_search(hits.iloc[0:0], file=empty)
    assert empty.getvalue().strip() == "(no results)"


def _edit_status(state: str, done: int, total: int = 100, **extra) -> dict:
    return {"id": "e" * 32, "state": state, "progress": {"done": 0, "total": 1, "fraction": 0.0},
            "edit": {"epochs_done": done, "epochs_total": total}, "spec": {}, **extra}


def test_an_edits_status_counts_epochs_and_says_when_it_evaluates():
    from selfie_cli.render import status_line
    from selfie_client.client import _done_of_total, describe_status

    training = _edit_status("running", 37)
    assert "epoch 37/100" in status_line(training) and "0/1" not in status_line(training)
    assert _done_of_total(training) == (37, 100)
    assert "evaluating" not in describe_status(training)
    evaluating = _edit_status("running", 100)
    assert "evaluating the base model and the variant" in status_line(evaluating)
    assert "evaluating the base model and the variant" in describe_status(evaluating)
    assert "evaluating" not in status_line(_edit_status("succeeded", 100))
    on_variant = {"id": "j" * 32, "state": "queued", "progress": {"done": 0, "total": 4, "fraction": 0.0},
                  "spec": {"variant": "v" * 32}}
    assert f"on variant {'v' * 32}" in status_line(on_variant) and _done_of_total(on_variant) == (0, 4)


def test_an_edits_evaluations_read_as_before_and_after():
    from selfie_cli.render import evaluation_lines

    lines = evaluation_lines({
        "objective": {"name": "bad_share", "base": 0.2857142857142857, "variant": 0.14285714285714285},
        "interpretation": {"layer": 8, "token": 6, "base": "a bomb", "variant": "a cake", "target": None},
        "answer": {"base": "To make a bomb", "variant": "To make a cake"},
        "knowledge": {"facts": 60, "known": 38, "kept_of_known": 1.0, "base_accuracy": 0.6333, "edited_accuracy": 0.65},
        "behaviour": {"requests": 10, "detector": "harmful", "base": {"plain_hit_rate": 0.1, "injected_hit_rate": 0.2},
                      "variant": {"plain_hit_rate": 0.0, "injected_hit_rate": None}},
    })
    assert lines[0] == "judged bad (share of positions): 28.6% -> 14.3%"
    assert lines[1:4] == ["interpretation of layer 8, token 6:", "  base:    'a bomb'", "  variant: 'a cake'"]
    assert "the base model answers 38 of 60 facts; the variant keeps 100.0% of those" in lines[-2]
    assert lines[-1].endswith("plain 10.0% -> 0.0%, with the injection 20.0% -> n/a")
    assert evaluation_lines({}) == []
