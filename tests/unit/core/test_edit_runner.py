"""The edit kinds' runner (workers.runners.edits) against a plain transcription of the notebooks' loops: the
service's edit gives the notebook's losses epoch by epoch, stores each epoch as it ends, serves other work between
epochs, stops at a cancel within one epoch, and saves the trained MLP to the artifact store."""

from __future__ import annotations

import copy

import pytest
import torch

from selfie_core import SelfieEngine
from selfie_core.edits import hidden_state, reinforce_template
from selfie_core.weights import weights_key
from workers.batcher import WorkItem
from workers.runners.edits import EditContext, EditRunner
from workers.variants import load_edit

from .conftest import _llama
from .test_edits import PROMPT, REFS, TARGET_PROMPT, _judge, notebook_reinforce, notebook_supervised


@pytest.fixture(scope="module")
def llama32(tokenizer):
    return _llama(tokenizer, seed=3).float()


class Recorder:
    def __init__(self, root, close_after: int | None = None):
        self.epochs: list[dict] = []
        self.served = 0
        self.close_after = close_after
        self.context = EditContext(store_epoch=self.store, job_closed=lambda job: False, serve_others=self.serve,
                                   store_root=root)

    def store(self, job, row):
        self.epochs.append(row)
        return self.close_after is None or len(self.epochs) < self.close_after

    def serve(self):
        self.served += 1


def _supervised_spec(target, anchor, epochs=12):
    return {"method": "supervised", "source": {"prompt": PROMPT, "layer": 2, "token": 6},
            "target_vector": target.tolist(), "target": None, "reference_texts": REFS, "beta": 10.0,
            "anchor": anchor, "refs_per_epoch": 4, "epochs": epochs, "lr": 3e-3, "seed": 7, "template": None,
            "injection": {"k": 1}, "generation": {"max_new_tokens": 4},
            "evaluations": {"knowledge": {"facts": [{"prompt": "The capital of France is", "attribute": "Paris"}]}}}


ITEM = WorkItem((11, 0), "job-1", "", {"owner_key_id": 3})


@pytest.mark.parametrize("anchor", ["current", "original"])
def test_supervised_runner_matches_the_notebook_loop(llama32, tokenizer, anchor, tmp_path):
    engine = SelfieEngine(llama32, tokenizer)
    target = hidden_state(engine, TARGET_PROMPT, 3, 4)
    recorder = Recorder(tmp_path)
    (batch,) = list(EditRunner(engine).bound(recorder.context).stream([ITEM], _supervised_spec(target, anchor)))
    (result,) = batch
    losses, trained = notebook_supervised(copy.deepcopy(llama32), tokenizer, PROMPT, 2, 6, target, REFS, 12, 10.0,
                                          anchor, seed=7, lr=3e-3)
    assert [r["epoch"] for r in recorder.epochs] == list(range(12))
    for ours, theirs in zip(recorder.epochs, losses):
        assert abs(ours["loss"] - theirs[0]) < 1e-5 and abs(ours["edit_loss"] - theirs[1]) < 1e-5
        assert abs(ours["keep_loss"] - theirs[2]) < 1e-5
    assert [r["loss"] for r in result.losses] == [r["loss"] for r in recorder.epochs]
    assert recorder.served == 11  # between epochs, not after the last
    assert weights_key(llama32) == ()  # the resident model never changed
    edit = load_edit(llama32, tmp_path, result.path, result.sha256, 2)
    for a, b in zip(edit.module.parameters(), trained.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    ev = result.evaluations
    assert ev["objective"]["name"] == "source_distance" and ev["objective"]["variant"] < ev["objective"]["base"]
    assert set(ev) == {"objective", "interpretation", "answer", "knowledge"}
    assert ev["knowledge"]["facts"] == 1 and result.owner_key_id == 3 and result.settings["reference_texts"] == 6


def test_reinforce_runner_matches_the_notebook_loop(llama32, tokenizer, tmp_path, monkeypatch):
    engine = SelfieEngine(llama32, tokenizer)
    runner = EditRunner(engine).bound(Recorder(tmp_path).context)
    monkeypatch.setattr(runner, "judge", lambda spec, item=None: _judge)
    spec = {"method": "reinforce", "prompt": PROMPT, "layer": 2, "judge": {"type": "detector"}, "epochs": 5,
            "lr": 1e-2, "seed": 0, "template": None, "injection": {"k": 2}, "generation": {"max_new_tokens": 8},
            "evaluations": {}}
    recorder = runner.context
    (batch,) = list(runner.stream([ITEM], spec))
    theirs = notebook_reinforce(copy.deepcopy(llama32), tokenizer, PROMPT, 2, _judge, reinforce_template(tokenizer),
                                5, 1e-2, 2, 8)
    assert [r["loss"] for r in batch[0].losses] == pytest.approx([t[0] for t in theirs], abs=1e-5)
    assert batch[0].evaluations["objective"]["name"] == "bad_share"
    assert recorder is runner.context


def test_a_cancel_stops_the_edit_within_one_epoch(llama32, tokenizer, tmp_path):
    engine = SelfieEngine(llama32, tokenizer)
    target = hidden_state(engine, TARGET_PROMPT, 3, 4)
    recorder = Recorder(tmp_path, close_after=3)
    out = list(EditRunner(engine).bound(recorder.context).stream([ITEM], _supervised_spec(target, "original", 50)))
    assert out == [] and len(recorder.epochs) == 3
    assert not (tmp_path / "variants").exists()  # nothing saved for a cancelled edit


def test_the_request_defaults_are_the_cores_measured_ones():
    from selfie_core import edits, judges
    from selfie_jobs.kinds import edit_requests

    assert edit_requests.SUPERVISED_DEFAULTS == edits.SUPERVISED_DEFAULTS
    assert edit_requests.REINFORCE_DEFAULTS == edits.REINFORCE_DEFAULTS
    assert (edit_requests.HARMFUL_QUESTION, edit_requests.ANSWER_PREFIX) == (judges.HARMFUL_QUESTION,
                                                                               judges.ANSWER_PREFIX)
