"""benchmarks/lens_eval.py: the tiny-model run produces the numbers and the plot the SmolLM2 run commits, and its
definitions (whole content words, naming) mean what the docs say."""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "lens_eval.py"


@pytest.fixture(scope="module")
def lens_eval():
    spec = importlib.util.spec_from_file_location("lens_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_words_are_whole_content_words(lens_eval):
    pieces = ["<s>", "A", " cashier", " gives", " counter", "feit", " money", ".", " the", " UN", " Ignore", "\"",
              "Ignore", ":", " 1135"]
    got = {t: lens_eval.word_at(pieces, t) for t in range(len(pieces))}
    assert got[2] == "cashier" and got[3] == "gives" and got[6] == "money"
    assert got[10] == "Ignore" and got[12] == "Ignore"  # ends before a quote; starts after one
    assert got[0] is None and got[1] is None  # a special token; one letter
    assert got[4] is None and got[5] is None  # 'counter' goes on; 'feit' does not start a word
    assert got[8] is None and got[9] is None  # a stopword; too short
    assert got[11] is None and got[14] is None  # not letters


@pytest.mark.parametrize("text, named", [("The Cashier said", True), ("cashier.", True), ("cashiers", False),
                                         ("a precashier", False), ("cash ier", False), ("", False)])
def test_names_is_the_whole_word_case_insensitive(lens_eval, text, named):
    assert lens_eval.names(text, "cashier") is named


def test_tiny_run_writes_the_numbers_and_the_plot(lens_eval, tmp_path, capsys):
    out, svg, cache = tmp_path / "eval.json", tmp_path / "eval.svg", tmp_path / "cache.json"
    argv = ["--tiny", "--pairs", "10", "--threads", "1", "--out", str(out), "--svg", str(svg), "--cache", str(cache)]
    result = lens_eval.main(argv)
    assert json.loads(out.read_text()) == result
    assert result["pairs"] == len(result["pair_list"]) == 10
    assert len({(p["prompt_index"], p["token"]) for p in result["pair_list"]}) == 10
    assert [r["layer"] for r in result["layers"]] == list(range(result["num_layers"] + 1)) == [0, 1, 2, 3, 4]
    assert result["selfie"]["layers"] == [0, 3, 4]
    assert "system" not in result["selfie"]["template"]
    for row in result["layers"]:
        for key in ("logit_precision_at_1", "identity_precision_at_1", "logit_top1_is_source",
                    "identity_top1_is_source"):
            assert 0.0 <= row[key] <= 1.0
        assert (row["selfie_naming_rate"] is not None) == (row["layer"] in result["selfie"]["layers"])
    # the logit lens over the last layer's state is the model's own prediction: a check on the scoring itself
    assert result["layers"][-1]["logit_precision_at_1"] == 1.0
    # the cached-prefix identity patch gives run_lenses's top-1 tokens (2 pairs x 5 layers checked)
    assert result["identity_path_check"] == {"readings": 10, "same_top1": 10}
    assert result["identity_beats_logit_at_layers"] == [
        r["layer"] for r in result["layers"] if r["identity_precision_at_1"] > r["logit_precision_at_1"]]
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert [len(p.get("points").split()) for p in lines] == [5, 5, 3]  # two lenses at every layer; SelfIE at 3
    assert "| layer |" in capsys.readouterr().out

    # a second run finds everything in the cache and computes nothing again
    stored = json.loads(cache.read_text())
    assert len(stored["lenses"]) == 10 * 5 and len(stored["selfie"]) == 10 * 3
    again = lens_eval.main(argv)
    assert again["layers"] == result["layers"]
    assert "readings (" not in capsys.readouterr().out
