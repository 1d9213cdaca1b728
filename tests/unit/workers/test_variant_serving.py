"""A worker's plans on a variant (`workers.tasks._start`, the real interpret runner over a tiny LLaMA engine, an
in-memory sink): a plan that names a variant runs on its weights, baseline included, never on the base model's
cached one; the base model's rows after serving a variant are bit-identical to those before; a variant that cannot
be served (row gone, file missing or changed) fails the plan's jobs with the reason and serves nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from selfie_core import SelfieEngine
from selfie_core.weights import MLPEdit, swapped_in, weights_key
from selfie_jobs.chunks import ClaimedChunk
from selfie_jobs.variants import VariantRef
from tests.unit.core.conftest import _llama, build_tokenizer
from tests.unit.workers.test_batcher import MemorySink
from workers import batcher
from workers.runners.interpret import EngineRunner
from workers.tasks import _BaselineFirst, _start
from workers.variants import VariantCache, save_edit

PROMPT = "The Eiffel Tower is located in Paris."
EDIT_JOB = "e" * 32
SPEC = {
    "template": {"parts": ["[INST]", 0, 0, "[/INST] Sure:"]},
    "injection": {"k": 1, "mode": "replace", "strength": 1.0},
    "generation": {"max_new_tokens": 6, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": None},
    "grounding": {"min_mean_relevancy": 0.05},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = _llama(tokenizer)
    engine = SelfieEngine(model, tokenizer, name="tiny")
    edit = MLPEdit(model, 0)  # block 0, below k: the interpretation prompt's own states change too
    with torch.no_grad():
        for p in edit.module.parameters():
            p.mul_(3.0)
    root = tmp_path_factory.mktemp("artifacts")
    path, sha = save_edit(root, EDIT_JOB, edit)
    runtime = SimpleNamespace(model="tiny", engine=engine, variants=VariantCache(model, root))
    return SimpleNamespace(model=model, tokenizer=tokenizer, engine=engine, edit=edit, root=root, runtime=runtime,
                           runner=EngineRunner(engine), ref=VariantRef("v1", "tiny", 1, path, sha))


def _run(served, job: str, spec: dict, refs: dict) -> tuple[dict, list, MemorySink]:
    """One plan of one job (every layer of token 2), as run_chunk runs it; returns its rows, its stored baselines
    and the sink."""
    items = tuple((0, layer, 2) for layer in range(5))
    chunk = ClaimedChunk(id=1, job_id=job, index=0, model="tiny", batch_key=str(sorted(spec.items())), priority=5,
                         items=items, attempts=1, spec=spec)
    [plan] = batcher.plan_batches([chunk], {(job, 0): PROMPT})
    sink = MemorySink(job_of={1: job})
    baselines: list = []
    runner = _BaselineFirst(served.runner, lambda: baselines.append(served.runner.baseline(plan.spec)))
    _start(served.runtime, plan, runner, sink, refs).wait()
    return {key[1:]: row for key, row in sink.rows.items()}, baselines, sink


def test_base_rows_are_bit_identical_after_serving_a_variant(served):
    params = {n: p.detach().clone() for n, p in served.model.named_parameters()}
    own = served.model.model.layers[0].mlp
    before, base_baseline, _ = _run(served, "base1", SPEC, {})
    on_variant, variant_baseline, sink = _run(served, "var1", {**SPEC, "variant": "v1"}, {"v1": served.ref})
    again, _, _ = _run(served, "var2", {**SPEC, "variant": "v1"}, {"v1": served.ref})  # from the worker's cache
    after, after_baseline, _ = _run(served, "base2", SPEC, {})

    assert not sink.failed and len(on_variant) == len(before) == 5
    assert [r.relevancy for r in on_variant.values()] != [r.relevancy for r in before.values()]
    assert again == on_variant and served.runtime.variants.cached() == ["v1"]
    assert after == before  # every field, the float relevancies included, bit for bit
    assert after_baseline == base_baseline
    assert served.model.model.layers[0].mlp is own and weights_key(served.model) == ()
    assert all(torch.equal(p, params[n]) for n, p in served.model.named_parameters())

    # the variant's baseline is its own, as an engine that never ran the base model computes it under the edit
    template, _, generation = served.runner.configs(SPEC)
    with swapped_in(served.model, served.edit):
        fresh = SelfieEngine(served.model, served.tokenizer).baseline(template, generation)
    assert variant_baseline == [fresh.to_dict()]
    assert variant_baseline != base_baseline


@pytest.mark.parametrize("damage, reason", [
    ("deleted", "no longer exists (it was deleted)"),
    ("missing", "weights file is missing"),
    ("corrupted", "weights file is corrupted"),
    ("other model", "edits model 'other'"),
])
def test_a_variant_that_cannot_be_served_fails_the_plan_with_the_reason(served, tmp_path, damage, reason):
    job_root = tmp_path / "store"
    path, sha = save_edit(job_root, EDIT_JOB, served.edit)
    ref = VariantRef("v2", "other" if damage == "other model" else "tiny", 1, path, sha)
    if damage == "missing":
        (job_root / path).unlink()
    if damage == "corrupted":
        data = bytearray((job_root / path).read_bytes())
        data[-1] ^= 1
        (job_root / path).write_bytes(bytes(data))
    runtime = served.runtime
    served.runtime = SimpleNamespace(model="tiny", engine=served.engine, variants=VariantCache(served.model, job_root))
    try:
        rows, baselines, sink = _run(served, "job", {**SPEC, "variant": "v2"}, {} if damage == "deleted" else
                                     {"v2": ref})
    finally:
        served.runtime = runtime
    assert rows == {} and baselines == []
    assert list(sink.failed) == ["job"] and sink.failed["job"].startswith("variant v2 cannot be served: ")
    assert reason in sink.failed["job"]
    assert served.model.model.layers[0].mlp is not served.edit.module and weights_key(served.model) == ()


def test_a_cached_variant_whose_file_went_is_not_served_from_memory(served, tmp_path):
    path, sha = save_edit(tmp_path, EDIT_JOB, served.edit)
    ref = VariantRef("v3", "tiny", 1, path, sha)
    cache = VariantCache(served.model, tmp_path)
    assert cache.get(ref.id, ref.path, ref.sha256, ref.layer) is cache.get(ref.id, ref.path, ref.sha256, ref.layer)
    (tmp_path / path).unlink()
    from selfie_jobs.variants import VariantUnavailable

    with pytest.raises(VariantUnavailable, match="missing"):
        cache.get(ref.id, ref.path, ref.sha256, ref.layer)
    assert cache.cached() == []


def test_a_cached_variant_whose_file_changed_fails_the_plan_as_an_uncached_one_does(served, tmp_path):
    """A byte flipped in place after the worker cached the variant: the file's stat differs (its mtime is set
    explicitly, so the test does not depend on the file system's timestamp granularity), the file is hashed again
    and the plan's jobs fail with the reason; a file only touched (same content) is checked and served again."""
    import os

    job_root = tmp_path / "store"
    path, sha = save_edit(job_root, EDIT_JOB, served.edit)
    ref = VariantRef("v4", "tiny", 1, path, sha)
    file = job_root / path
    runtime = served.runtime
    served.runtime = SimpleNamespace(model="tiny", engine=served.engine, variants=VariantCache(served.model, job_root))
    try:
        first, _, _ = _run(served, "first", {**SPEC, "variant": "v4"}, {"v4": ref})
        assert first and served.runtime.variants.cached() == ["v4"]
        mtime = file.stat().st_mtime_ns
        os.utime(file, ns=(mtime + 10**9, mtime + 10**9))  # touched, content unchanged: checked, still served
        touched, _, sink = _run(served, "touched", {**SPEC, "variant": "v4"}, {"v4": ref})
        assert touched == first and not sink.failed
        with open(file, "r+b") as f:  # the same inode and size, one byte changed
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        os.utime(file, ns=(mtime + 2 * 10**9, mtime + 2 * 10**9))
        rows, baselines, sink = _run(served, "job", {**SPEC, "variant": "v4"}, {"v4": ref})
    finally:
        served.runtime = runtime
    assert rows == {} and baselines == []
    assert list(sink.failed) == ["job"] and "weights file is corrupted" in sink.failed["job"]
    assert served.model.model.layers[0].mlp is not served.edit.module and weights_key(served.model) == ()
