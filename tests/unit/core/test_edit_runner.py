"""The edit kinds' runner (workers.runners.edits) against a plain transcription of the notebooks' loops: the
service's edit gives the notebook's losses epoch by epoch, stores each epoch as it ends, serves other work between
epochs, stops at a cancel within one epoch, and saves the trained MLP to the artifact store."""

from __future__ import annotations

import copy

import pytest
import torch

from selfie_core import SelfieEngine, SelfieInputError
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
    def __init__(self, root, close_after: int | None = None, close_on_serve: int | None = None):
        self.epochs: list[dict] = []
        self.served_at: list[int] = []  # the epochs done at each time other work was served
        self.close_after = close_after
        self.close_on_serve = close_on_serve  # the job is closed once other work was served this often
        self.context = EditContext(store_epoch=self.store, job_closed=self.closed, serve_others=self.serve,
                                   store_root=root)

    @property
    def served(self) -> int:
        return len(self.served_at)

    def store(self, job, row):
        self.epochs.append(row)
        return self.close_after is None or len(self.epochs) < self.close_after

    def closed(self, job) -> bool:
        return self.close_on_serve is not None and self.served >= self.close_on_serve

    def serve(self):
        self.served_at.append(len(self.epochs))


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
    # between epochs, not after the last; then between the evaluation's steps
    assert recorder.served_at[:11] == list(range(1, 12)) and set(recorder.served_at[11:]) == {12}
    assert recorder.served > 12
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
    # the before/after interpretation is read with the edit's own template (the notebook's), as the judge read
    # them, not with the engine's default preset; the settings say which template that was
    from selfie_core.edit_evals import interpret_state

    shown = batch[0].evaluations["interpretation"]
    assert shown["base"] == interpret_state(engine, PROMPT, 2, shown["token"], template=reinforce_template(tokenizer),
                                            k=2, max_new_tokens=8)
    assert batch[0].settings["template"].startswith("materials-mentioned")
    # the answer to the source prompt is what a generate job (one chat turn, no system prompt) gives
    from workers.runners.generate import generate_texts

    answer = batch[0].evaluations["answer"]
    assert answer["base"] == generate_texts(engine, [PROMPT], chat=True, max_new_tokens=answer["max_new_tokens"])[0].text


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


def test_a_diverging_edit_fails_as_an_input_error_and_saves_nothing(llama32, tokenizer, tmp_path):
    engine = SelfieEngine(llama32, tokenizer)
    spec = {**_supervised_spec(torch.full((engine.hidden_size,), 3.0e38), "original", epochs=3), "lr": 10.0,
            "beta": 1e6}
    recorder = Recorder(tmp_path)
    runner = EditRunner(engine).bound(recorder.context)
    with pytest.raises(SelfieInputError, match=r"training diverged at epoch 0: the loss is not finite; "
                                               r"lower lr or beta") as info:
        list(runner.stream([ITEM], spec))
    assert runner.is_input_error(info.value)  # the job fails once, with this reason
    assert recorder.epochs == [] and not (tmp_path / "variants").exists()


def test_weights_that_stop_being_finite_fail_the_edit_before_anything_is_saved(llama32, tokenizer, tmp_path,
                                                                               monkeypatch):
    from selfie_core.edits import SupervisedEdit

    engine = SelfieEngine(llama32, tokenizer)
    target = hidden_state(engine, TARGET_PROMPT, 3, 4)
    step = SupervisedEdit._step

    def poisoned(self, loss):  # the last step leaves a NaN weight behind a finite loss
        step(self, loss)
        if len(self.history) == self.epochs - 1:
            with torch.no_grad():
                next(self.edit.module.parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(SupervisedEdit, "_step", poisoned)
    recorder = Recorder(tmp_path)
    with pytest.raises(SelfieInputError, match="training diverged at epoch 2: the trained weights are not finite"):
        list(EditRunner(engine).bound(recorder.context).stream([ITEM], _supervised_spec(target, "original", 3)))
    assert len(recorder.epochs) == 2 and not (tmp_path / "variants").exists()


def test_a_cancel_during_the_evaluation_stops_it_between_steps_and_saves_nothing(llama32, tokenizer, tmp_path):
    engine = SelfieEngine(llama32, tokenizer)
    target = hidden_state(engine, TARGET_PROMPT, 3, 4)
    spec = _supervised_spec(target, "original", epochs=2)
    spec["evaluations"]["behaviour"] = {"requests": [f"request {i}" for i in range(70)], "max_new_tokens": 2,
                                        "detector": {"kind": "keywords", "words": ["zzz"]}}
    recorder = Recorder(tmp_path, close_on_serve=3)  # 1 between the epochs, 2 in the evaluation
    out = list(EditRunner(engine).bound(recorder.context).stream([ITEM], spec))
    assert out == [] and len(recorder.epochs) == 2 and recorder.served == 3
    assert not (tmp_path / "variants").exists()
    # without a cancel the evaluation serves other work between its steps: each figure, each slice of 64 requests
    recorder = Recorder(tmp_path)
    (batch,) = list(EditRunner(engine).bound(recorder.context).stream([ITEM], spec))
    assert batch[0].evaluations["behaviour"]["requests"] == 70
    assert recorder.served_at.count(2) == 4 + 2 + 2 * 2  # 4 figures, 1 slice of 1 fact twice, 2 slices twice
