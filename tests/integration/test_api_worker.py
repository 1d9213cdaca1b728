"""End to end over real HTTP with a real worker process (tiny random LLaMA) and a private Redis: submit through
the API, watch progress, read and filter results, cancel a running job; SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from selfie_client import Client
from selfie_jobs.db import get_engine, session_scope
from selfie_jobs.models import Chunk, Interpretation
from tests.apisupport import live_server, settings_for
from tests.integration.worker_support import (
    MODEL,
    NUM_LAYERS,
    PROMPTS,
    WorkerProcess,
    save_tiny_model,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / MODEL)


@pytest.fixture(scope="module")
def private_redis_url(tmp_path_factory):
    """A Redis of this module's own: no other test session's worker or flush touches its "tiny" queue."""
    from workers.embedded import start_embedded_redis

    with start_embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def served(migrated_database_url, private_redis_url, tmp_path, tiny_model_dir):
    redis.Redis.from_url(private_redis_url).flushdb()
    env = worker_env(migrated_database_url, private_redis_url, tmp_path / "w1", SELFIE_CHUNK_SIZE="4")
    worker = WorkerProcess("apiw1", tiny_model_dir, env, tmp_path, batch_size=4)
    try:
        settings = settings_for(migrated_database_url, private_redis_url, chunk_size=4, default_model=MODEL,
                                worker_alive_seconds=6, max_new_tokens_cap=64)
        with live_server(settings) as server, Client(server.url) as client:
            def ready():
                if worker.proc.poll() is not None:
                    raise AssertionError(worker.log()[-4000:])
                return any(m["name"] == MODEL and any(w["state"] == "ready" for w in m["workers"])
                           for m in client.models())

            wait_for(ready, 120, what="worker ready")
            wait_for(lambda: "ready." in worker.log(), 30, what="worker consuming")
            yield client, migrated_database_url, worker
    finally:
        worker.stop()
        get_engine.cache_clear()


def test_submit_progress_results_and_filters_through_the_api(served):
    client, _, worker = served
    tokens = client.tokenize(PROMPTS[0], MODEL)
    df = client.interpret(list(PROMPTS), layers="all", tokens=[0, -1], max_new_tokens=4, progress=False,
                          timeout=120, poll=0.2)
    assert df.attrs["state"] == "succeeded"
    assert len(df) == len(PROMPTS) * (NUM_LAYERS + 1) * 2
    assert df[["prompt_index", "layer", "token"]].duplicated().sum() == 0
    first = df[df.prompt_index == 0]
    assert set(first.token) == {0, len(tokens) - 1}
    assert set(first.source_token) == {tokens[0], tokens[-1]}
    assert all(isinstance(t, str) for t in df.text) and all(len(r) > 0 for r in df.relevancy)
    status = client.status(df.attrs["job_id"])
    assert status["progress"] == {"done": len(df), "total": len(df), "fraction": 1.0, "in_flight": 0,
                                  "decode_step": None, "decode_steps": None, "rows_per_second": None,
                                  "eta_seconds": None}
    assert status["timings"]["running_seconds"] is not None and status["chunks"]["done"] == 3  # 12 items, 4 a chunk
    assert len(client.results(df.attrs["job_id"], layer_min=1, prompt=1)) == NUM_LAYERS * 2
    models = client.models()
    assert models[0]["name"] == MODEL and models[0]["num_layers"] == NUM_LAYERS


def test_cancel_a_running_job(served):
    client, database_url, _ = served
    # many small chunks with long generations: the job is still running when it is cancelled
    job = client.submit([PROMPTS[0]] * 6, layers="all", tokens="all", max_new_tokens=48)
    wait_for(lambda: client.status(job["id"], include_prompts=False)["progress"]["done"] > 0, 120, interval=0.1,
             what="first results")
    out = client.cancel(job["id"])
    assert out["cancelled"] is True

    def count(*where):
        with session_scope(database_url) as s:
            return (s.scalar(select(func.count()).select_from(Interpretation).where(Interpretation.job_id == job["id"])),
                    s.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id == job["id"], *where)))

    # the cancel has committed: no write from now on may add a row
    at_cancel, _ = count()
    # a chunk the worker held finishes its engine batch, writes nothing and is closed by that write
    wait_for(lambda: count(Chunk.state == "running")[1] == 0, 60, interval=0.1, what="no chunk of the job running")
    rows, open_chunks = count(Chunk.state.in_(["queued", "running"]))
    status = client.status(job["id"])
    assert status["state"] == "cancelled" and status["chunks"]["queued"] == 0
    assert 0 < rows < job["total"] and open_chunks == 0
    assert rows == at_cancel == status["progress"]["done"]  # nothing written after the cancel


def test_vectors_through_the_service_equal_the_engine_in_process(served, tiny_model_dir):
    """A vectors job (a torch tensor through the client's .npy upload, and expressions over hidden states) gives
    what the engine's own `interpret_vectors` gives for the same vectors, one row per vector, exactly once."""
    import torch

    from selfie_core import GenerationConfig, SelfieEngine, VectorRequest, load_model
    from selfie_client.vectors import expression, state

    client, database_url, _ = served
    engine = SelfieEngine(load_model(str(tiny_model_dir)))
    summarize = "summarize"  # the service's default template (the card's default preset)
    torch.manual_seed(1)
    vectors = torch.randn(6, engine.hidden_size) * 3
    labels = [f"direction {i}" for i in range(6)]
    df = client.interpret_vectors(vectors, labels, max_new_tokens=5, progress=False, timeout=120, poll=0.2)
    expected = engine.interpret_vectors([VectorRequest(v, key=i) for i, v in enumerate(vectors)], summarize,
                                        generation=GenerationConfig(max_new_tokens=5))
    assert df.attrs["state"] == "succeeded"
    assert list(df.vector_index) == list(range(6)) and list(df.label) == labels
    assert list(df.text) == [r.text for r in expected]
    assert [list(t) for t in df.token_ids] == [r.token_ids for r in expected]
    for got, want in zip(df.relevancy, expected):
        assert got == pytest.approx(want.relevancy, abs=1e-4)
    assert list(df.norm) == pytest.approx([float(v.norm()) for v in vectors], rel=1e-5)

    # the difference of two hidden states, extracted by the worker itself
    a, b = PROMPTS
    exprs = [expression(state(a, 1, -1), state(b, 1, -1, coef=-1)), expression(state(a, 2, 0, coef=0.5))]
    out = client.interpret_vectors(expressions=exprs, labels=["a - b", "half a"], max_new_tokens=5, progress=False,
                                   timeout=120, poll=0.2)
    states = engine.hidden_states({a: [(1, -1), (2, 0)], b: [(1, -1)]})
    diff = states[a][(1, -1)] - states[b][(1, -1)]
    half = 0.5 * states[a][(2, 0)]
    want = engine.interpret_vectors([diff, half], summarize, generation=GenerationConfig(max_new_tokens=5))
    assert list(out.label) == ["a - b", "half a"] and list(out.text) == [r.text for r in want]
    assert list(out.norm) == pytest.approx([float(diff.norm()), float(half.norm())], rel=1e-5)
    with session_scope(database_url) as s:
        from selfie_jobs.models import VectorInterpretation

        assert s.scalar(select(func.count()).select_from(VectorInterpretation)) == 8


def test_lenses_through_the_service_equal_the_engine_in_process(served, tiny_model_dir):
    """A lenses job gives, per (prompt, layer, token), what `selfie_core.lenses.run_lenses` gives in process: the
    model's own top-k, each lens's top-k, the match of its top-1 and the probability it gives the model's top-1;
    one row per item, exactly once, also as CSV."""
    from selfie_core import SelfieEngine, load_model
    from selfie_core.lenses import LensRequest, run_lenses
    from selfie_jobs.models import LensReading

    client, database_url, _ = served
    engine = SelfieEngine(load_model(str(tiny_model_dir)))
    df = client.lenses(list(PROMPTS), layers="all", tokens=[0, -1], top_k=3, progress=False, timeout=120,
                       poll=0.2)
    assert df.attrs["state"] == "succeeded"
    assert len(df) == len(PROMPTS) * (NUM_LAYERS + 1) * 2
    assert df[["prompt_index", "layer", "token"]].duplicated().sum() == 0
    requests = [LensRequest(PROMPTS[p], layer, token) for p, layer, token in
                zip(df.prompt_index, df.layer, df.token)]
    want = [r for batch in run_lenses(engine, requests, top_k=3) for r in batch]
    for (_, got), reading in zip(df.iterrows(), want):
        assert got.source_token == reading.source_token
        for lens in ("model", "logit", "identity"):
            assert list(got[f"{lens}_token_ids"]) == getattr(reading, lens).token_ids
            assert list(got[f"{lens}_tokens"]) == getattr(reading, lens).tokens
            assert list(got[f"{lens}_probs"]) == pytest.approx(getattr(reading, lens).probs, abs=1e-5)
        assert got.logit_matches == reading.matches("logit") and got.identity_matches == reading.matches("identity")
        assert got.logit_model_prob == pytest.approx(reading.logit_model_prob, abs=1e-5)
        assert got.identity_model_prob == pytest.approx(reading.identity_model_prob, abs=1e-5)
    last = df[df.layer == NUM_LAYERS]
    assert last.logit_matches.all()  # the logit lens at the last layer is the model's own prediction
    csv = client.rows_csv(df.attrs["job_id"])
    assert len(csv.strip().splitlines()) == len(df) + 1
    only_logit = client.lenses(PROMPTS[0], layers=[1], tokens=[-1], lenses=["logit"], progress=False, timeout=120,
                               poll=0.2)
    assert only_logit.identity_tokens.isna().all() and only_logit.identity_matches.isna().all()
    with session_scope(database_url) as s:
        assert s.scalar(select(func.count()).select_from(LensReading)) == len(df) + 1


def test_baseline_and_grounding_through_the_service_equal_the_engine_in_process(served, tiny_model_dir):
    """A job's status shows its baseline, and every row its grounded judgement, as the engine in process computes
    them for the same template (a system prompt given through the client), settings and threshold; the JSON and
    CSV exports and the DataFrame carry them, and `grounded` filters rows."""
    import csv
    import io

    from selfie_core import GenerationConfig, InterpretRequest, SelfieEngine, load_model

    client, database_url, _ = served
    engine = SelfieEngine(load_model(str(tiny_model_dir)))
    template = {"preset": "describe", "system": "Be brief."}
    generation = GenerationConfig(max_new_tokens=6)
    n = len(engine.tokenizer(PROMPTS[0]).input_ids)
    requests = [InterpretRequest(PROMPTS[0], layer, t) for layer in range(NUM_LAYERS + 1) for t in range(n)]
    # a threshold that splits this random model's rows (its relevancies are not a real model's)
    means = sorted(r.mean_relevancy for r in engine.interpret(requests, template, generation=generation))
    threshold = round(means[len(means) // 2], 6)
    want = engine.interpret(requests, template, generation=generation, grounding={"min_mean_relevancy": threshold})
    df = client.interpret(PROMPTS[0], layers="all", tokens="all", template="describe", system="Be brief.",
                          max_new_tokens=6, grounding={"min_mean_relevancy": threshold}, progress=False, timeout=120,
                          poll=0.2)
    job_id = df.attrs["job_id"]
    status = client.status(job_id)
    assert status["spec"]["template"] == template
    assert status["spec"]["grounding"] == {"min_mean_relevancy": threshold}
    assert status["baseline"] == engine.baseline(template, generation).to_dict()
    assert df.attrs["baseline"] == status["baseline"]
    got = df.sort_values(["layer", "token"])
    assert list(got.text) == [r.text for r in want]
    assert list(got.grounded) == [r.grounded for r in want]
    assert list(got.ungrounded_reason.fillna("")) == [r.ungrounded_reason or "" for r in want]
    assert str(got.grounded.dtype) == "boolean"
    reasons = {r.ungrounded_reason for r in want}
    assert "low_relevancy" in reasons and None in reasons  # the threshold splits this job's rows

    ungrounded = client.results(job_id, grounded=False)
    assert len(ungrounded) == sum(not r.grounded for r in want) and not ungrounded.grounded.any()
    rows = list(csv.DictReader(io.StringIO(client.results_csv(job_id))))
    assert {r["grounded"] for r in rows} == {"true", "false"}
    assert sorted(r["ungrounded_reason"] for r in rows) == sorted(r.ungrounded_reason or "" for r in want)
    generic = list(csv.DictReader(io.StringIO(client.rows_csv(job_id))))
    assert [(r["grounded"], r["ungrounded_reason"]) for r in generic] == [(r["grounded"], r["ungrounded_reason"])
                                                                          for r in rows]
    with session_scope(database_url) as s:
        stored = s.scalars(select(Interpretation.grounded).where(Interpretation.job_id == job_id)).all()
    assert None not in stored


def test_generate_through_the_service_equals_generation_in_process(served, tiny_model_dir):
    """A generate job gives each prompt what the worker's generation code gives it in process (chat format and
    greedy by default; raw and sampled with a seed), one row per prompt, exactly once; `Client.generate` returns the
    texts in order, the rows come as JSON and CSV, and `selfie generate` prints them."""
    import subprocess
    import sys

    from selfie_core import SelfieEngine, load_model
    from selfie_jobs.models import Generation
    from tests.integration.worker_support import ROOT
    from workers.runners.generate import generate_texts

    client, database_url, _ = served
    engine = SelfieEngine(load_model(str(tiny_model_dir)))
    prompts = [*PROMPTS, "Paris"]
    texts = client.generate(prompts, max_new_tokens=8, progress=False, timeout=120, poll=0.2)
    want = generate_texts(engine, prompts, max_new_tokens=8)
    assert texts == [g.text for g in want]
    sampled = dict(chat=False, do_sample=True, temperature=1.3, top_p=0.9, seed=3, max_new_tokens=8)
    accepted = client.submit_generate(prompts, **sampled)
    assert client.wait(accepted["id"], progress=False, timeout=120, poll=0.2)["state"] == "succeeded"
    rows = client.generations(accepted["id"])
    want_sampled = generate_texts(engine, prompts, **sampled)
    assert list(rows.prompt_index) == [0, 1, 2]
    assert [list(t) for t in rows.token_ids] == [list(g.token_ids) for g in want_sampled]
    assert list(rows.text) == [g.text for g in want_sampled] and list(rows.finish) == [g.finish for g in want_sampled]
    assert set(rows.finish) <= {"eos", "length"}
    csv_text = client.rows_csv(accepted["id"])
    assert csv_text.splitlines()[0].startswith("prompt_index,text,finish,token_ids") and \
        len(csv_text.strip().splitlines()) >= len(prompts) + 1
    with session_scope(database_url) as s:
        assert s.scalar(select(func.count()).select_from(Generation)) == 2 * len(prompts)
        assert s.scalar(select(func.count(func.distinct(Generation.prompt_index))).where(
            Generation.job_id == accepted["id"])) == len(prompts)
    out = subprocess.run([sys.executable, "-m", "selfie_cli", "generate", PROMPTS[0], "--raw", "--max-new-tokens",
                          "8", "--url", client.url], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (raw,) = generate_texts(engine, [PROMPTS[0]], chat=False, max_new_tokens=8)
    assert out.stdout.startswith(f"prompt 0: {PROMPTS[0]}\n{raw.text}")

