"""The edit kinds' runner (`supervised`, `reinforce`): one job's edit trained on the resident engine with
`selfie_core.edits`, epoch by epoch, then evaluated on the base model and on the variant, and its MLP saved to the
artifact store.

Invariants:
- the resident model's weights never change (the edit trains a copy, swapped in only for its own computations);
- after each epoch its row goes to `edit_epochs` (the job's progress) and the job's state is read in the same
  transaction (a cancel stops the edit at the end of the epoch it lands in; the heartbeat's `BatchWatch` is looked
  at too, after other work), and the task layer may run one engine run of other jobs' queued work
  of this model (`EditContext.serve_others`), so no job waits for a whole edit; between evaluation steps the same
  (cancel check, other work);
- a run that diverges (a loss or a weight not finite) or a judge's sub-job that cannot be served fails the job once,
  as an input error (retrying would train again to the same end), and stores nothing;
- the variant's file is named by its content (`workers.variants.save_edit`): an edit restarted from scratch never
  changes a stored file; the result (one per job) is stored by the normal write path with the chunk marked done.

The runner is built once per worker process; `bound(context)` gives the copy one task runs with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.batcher import WorkItem
from workers.runners.interpret import EngineRunner, spec_template

#: Greedy new tokens of the answer to the source prompt shown before and after (the notebook's check).
ANSWER_TOKENS = 50


@dataclass(frozen=True)
class EditContext:
    """What the task layer lends one edit: the database (epoch rows), the cancel check, other work, the store."""

    store_epoch: Callable[[str, dict[str, Any]], bool]  # stores an epoch's row; False once the job is closed
    job_closed: Callable[[str], bool]
    serve_others: Callable[[], None]
    store_root: Path
    #: generate(model, prompts, max_new_tokens, item) -> texts: a `generate` sub-job on another served model
    #: (`workers.subjobs.generate_on`), for a judge that model is
    generate: Callable[[str, Sequence[str], int, WorkItem], list[str]] | None = None
    #: cancel_stale_subjobs(item): cancels the sub-jobs an earlier attempt of the edit left open
    cancel_stale_subjobs: Callable[[WorkItem], None] | None = None


class RemoteJudge:
    """A chat model served by other workers asked the judge's question about each text (one sub-job per call); its
    answer maps to a reward as `selfie_core.judges.ChatJudge`'s does. The answer is the model's own assistant turn
    (a generate job opens it; the in-process judge's assistant prefix is not sent)."""

    def __init__(self, generate: Callable[[Sequence[str]], list[str]], judge: dict[str, Any]):
        self.generate, self.judge = generate, judge
        self.answers: list[tuple[str, str]] = []

    def many(self, texts: Sequence[str]) -> list[int]:
        from selfie_core.judges import reward_from_answer

        answers = self.generate([self.judge["question"].format(interpretation=t) for t in texts])
        self.answers.extend(zip(texts, answers))
        return [reward_from_answer(a, self.judge["accept"], self.judge["reject"]) for a in answers]

    def __call__(self, text: str) -> int:
        return self.many([text])[0]


@dataclass(frozen=True)
class EditResult:
    """A finished edit: what `_EditKind.row_from` stores as the job's variant."""

    key: tuple[int, ...]
    variant_id: str
    owner_key_id: int | None
    layer: int
    path: str
    sha256: str
    settings: dict[str, Any]
    losses: list[dict[str, Any]]
    evaluations: dict[str, Any]
    mean_relevancy: float = 0.0  # the batcher's finiteness check reads these of every result
    relevancy: tuple[float, ...] = field(default_factory=tuple)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def epoch_row(report: Any) -> dict[str, Any]:
    """An epoch as `edit_epochs` and the variant's `losses` hold it (None where not finite)."""
    return {"epoch": report.epoch, "loss": _finite(report.loss), "edit_loss": _finite(report.edit_loss),
            "keep_loss": _finite(report.keep_loss), "bad_share": _finite(report.bad_share),
            "rewards": report.rewards, "interpretations": report.interpretations}


class EditRunner(EngineRunner):
    baseline = None  # an edit job has no interpretation baseline

    def __init__(self, engine: Any, batch_size: int | None = None, watch: Any = None,
                 context: EditContext | None = None):
        super().__init__(engine, batch_size, watch)
        self.context = context

    def bound(self, context: EditContext) -> EditRunner:
        return type(self)(self.engine, self.batch_size, self.watch, context)

    def validate(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> None:
        return None  # the edit's own constructor checks its input (SelfieInputError fails the job)

    # -- the pieces ---------------------------------------------------------------------------------------
    def template(self, spec: dict[str, Any]) -> Any:
        return spec_template(spec["template"], self.engine.tokenizer) if spec.get("template") else None

    def build(self, spec: dict[str, Any], item: WorkItem | None = None) -> Any:
        from selfie_core.edit_evals import load_reference_texts
        from selfie_core.edits import ReinforceEdit, SupervisedEdit, hidden_state

        engine = self.engine
        if spec["method"] == "supervised":
            source = spec["source"]
            if spec.get("target_vector") is not None:
                import torch

                target = torch.tensor(spec["target_vector"], dtype=torch.float32)
            else:
                t = spec["target"]
                target = hidden_state(engine, t["prompt"], t["layer"], t["token"])
            refs = spec.get("reference_texts") or load_reference_texts()
            return SupervisedEdit(engine, source["prompt"], source["layer"], source["token"], target, refs,
                                  beta=spec["beta"], epochs=spec["epochs"], lr=spec["lr"], anchor=spec["anchor"],
                                  refs_per_epoch=spec["refs_per_epoch"], seed=spec["seed"])
        return ReinforceEdit(engine, spec["prompt"], spec["layer"], self.judge(spec["judge"], item),
                             template=self.template(spec), epochs=spec["epochs"], lr=spec["lr"],
                             k=spec["injection"]["k"], max_new_tokens=spec["generation"]["max_new_tokens"],
                             seed=spec["seed"], batch_size=self.batch_size)

    def judge(self, judge: dict[str, Any], item: WorkItem | None = None) -> Any:
        from selfie_core.judges import ChatJudge, detector_judge
        from selfie_jobs.audit_detectors import build

        if judge["type"] == "detector":
            return detector_judge(build(judge["detector"]), clean=judge["clean"])
        if judge.get("remote"):  # another served model: a sub-job on its queue
            generate = self.context.generate if self.context is not None else None
            if generate is None or item is None:
                raise RuntimeError("a judge on another model needs the task layer's sub-jobs (EditContext.generate)")
            return RemoteJudge(lambda prompts: generate(judge["model"], prompts, judge["max_new_tokens"], item), judge)
        # the edited model's own base, judging with its own weights
        return ChatJudge(self.engine.model, self.engine.tokenizer, judge["question"], judge["assistant_prefix"],
                         judge["max_new_tokens"], judge["accept"], judge["reject"])

    # -- the run ------------------------------------------------------------------------------------------
    def stream(self, items: Sequence[WorkItem], spec: dict[str, Any]) -> Iterator[list[Any]]:
        if self.context is None:
            raise RuntimeError("an edit runs with the task layer's context (EditRunner.bound)")
        from selfie_jobs.models import new_job_id
        from workers.variants import save_edit

        from workers.subjobs import EditStopped

        (item,) = items
        if self.context.cancel_stale_subjobs is not None and (spec.get("judge") or {}).get("remote"):
            self.context.cancel_stale_subjobs(item)  # an earlier attempt's, left when its worker died
        try:
            finished = self._train(item, spec)
        except EditStopped:
            return  # closed while it waited for a sub-job (which was cancelled with it) or between evaluations
        if finished is None:
            return
        run, losses, evaluations = finished
        run.check_finite(len(losses) - 1)  # the weights about to be saved (a run checks them after every step)
        if self.context.job_closed(item.job_id):
            return  # the last cancel check: a cancelled edit writes no file (the task layer removes one written
            #         before a cancel that its write then finds)
        path, sha256 = save_edit(self.context.store_root, item.job_id, run.edit)
        yield [EditResult(key=item.key, variant_id=new_job_id(), owner_key_id=(item.payload or {}).get("owner_key_id"),
                          layer=run.layer, path=path, sha256=sha256, settings=run_settings(spec),
                          losses=losses, evaluations=evaluations)]

    def _train(self, item: WorkItem, spec: dict[str, Any]) -> tuple[Any, list[dict[str, Any]], dict[str, Any]] | None:
        """The trained edit, its losses and evaluations; None when the job was closed between epochs."""
        job_id, ctx = item.job_id, self.context
        run = self.build(spec, item)
        losses: list[dict[str, Any]] = []
        for report in run:
            row = epoch_row(report)
            still_open = ctx.store_epoch(job_id, row)
            losses.append({k: row[k] for k in ("epoch", "loss", "edit_loss", "keep_loss", "bad_share")})
            if not still_open or ctx.job_closed(job_id):
                return None  # cancelled: nothing is stored (the batcher closes the chunk as the job's state says)
            if len(losses) < run.epochs:
                ctx.serve_others()
                if ctx.job_closed(job_id):
                    return None
        return run, losses, self.evaluate(run, spec, lambda: self._between_steps(job_id))

    def _between_steps(self, job_id: str) -> None:
        """Between two evaluation steps, as between epochs: stop on a cancel (`EditStopped`), serve other work."""
        from workers.subjobs import EditStopped

        ctx = self.context
        if ctx.job_closed(job_id):
            raise EditStopped(job_id)
        ctx.serve_others()
        if ctx.job_closed(job_id):
            raise EditStopped(job_id)

    def evaluate(self, run: Any, spec: dict[str, Any], between: Callable[[], None] = lambda: None) -> dict[str, Any]:
        from workers.runners.edit_evals import evaluate

        # the template the edit's own interpretations used (a reinforce edit's default is the notebook's, not the
        # engine's), so that the before/after interpretation is the one the judge read
        template = getattr(run, "template", None) or self.template(spec)
        return evaluate(self.engine, run, spec, template, between)

    def is_input_error(self, exc: BaseException) -> bool:
        from workers.subjobs import SubJobFailed

        # a sub-job refused, failed or cancelled by someone else, or not served in time: a new attempt would
        # train again only to meet the same refusal
        return isinstance(exc, SubJobFailed) or super().is_input_error(exc)


def run_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """The settings as run, for the variant's row: the spec without its bulky inputs (the target vector, the
    reference texts and evaluation data), which it counts instead."""
    out = {k: v for k, v in spec.items() if k not in ("target_vector", "reference_texts", "evaluations")}
    if spec["method"] == "supervised":
        refs = spec.get("reference_texts")
        out["reference_texts"] = "built-in" if refs is None else len(refs)
        out["target_vector"] = None if spec.get("target_vector") is None else len(spec["target_vector"])
    out["evaluations"] = sorted(spec.get("evaluations") or {})
    if spec["method"] == "reinforce" and spec.get("template") is None:
        out["template"] = "materials-mentioned (the notebook's)"  # what ReinforceEdit interprets with by default
    return out
