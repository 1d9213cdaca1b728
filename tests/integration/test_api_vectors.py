"""The `vectors` kind over real HTTP (uvicorn), SQLite and PostgreSQL, real Redis: JSON, expressions and file
uploads are accepted, stored and enqueued; every bad input is a clear 4xx with nothing stored and nothing enqueued."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from sqlalchemy import func, select

from selfie_jobs.db import session_scope
from selfie_jobs.models import Chunk, Job, JobVector, Prompt
from tests.apisupport import (
    NUM_LAYERS,
    flush_model_queue,
    live_server,
    message_chunk_ids,
    prepare_database,
    queued_messages,
    settings_for,
)

HIDDEN = 16  # the tiny card's hidden size


@pytest.fixture
def env(database_url, redis_url):
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=model)
    yield database_url, redis_url, model
    flush_model_queue(redis_url, model)


@pytest.fixture
def server(env):
    database_url, redis_url, model = env
    settings = settings_for(database_url, redis_url, max_vectors_per_job=20, max_vector_upload_bytes=4096,
                            max_expression_terms=3)
    with live_server(settings) as srv:
        srv.model = model
        yield srv


def vec(value: float = 0.5, n: int = HIDDEN) -> list[float]:
    return [value] * n


def term(prompt="the cat sat on the mat", layer=2, token=-1, coef=1.0):
    return {"coef": coef, "prompt": prompt, "layer": layer, "token": token}


def count(url, entity) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(entity))


def assert_nothing_stored(database_url, redis_url, model):
    assert count(database_url, Job) == count(database_url, Chunk) == count(database_url, JobVector) == 0
    assert count(database_url, Prompt) == 0
    assert queued_messages(redis_url, model) == []


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_json_vectors_are_stored_and_enqueued(env, server):
    database_url, redis_url, model = env
    vectors = [vec(i / 10) for i in range(10)]
    with server.client() as http:
        resp = http.post("/v1/jobs/vectors", json={"model": model, "vectors": vectors,
                                                   "labels": [f"v{i}" for i in range(10)], "priority": 6})
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        status = http.get(accepted["link"]).json()
        results = http.get(accepted["links"]["results"]).json()
    assert accepted["kind"] == "vectors" and accepted["total"] == 10 and accepted["chunks"] == 2
    assert status["kind"] == "vectors" and status["progress"]["total"] == 10 and status["prompts"] == []
    assert results == {"job_id": accepted["id"], "kind": "vectors", "state": "queued", "items": [],
                       "next_cursor": None, "variant": None, "columns": ["vector_index", "label", "norm", "text", "mean_relevancy",
                                                        "relevancy", "token_ids", "worker", "model", "created_at"]}
    with session_scope(database_url) as s:
        job = s.get(Job, accepted["id"])
        assert job.kind == "vectors"
        stored = s.scalars(select(JobVector).where(JobVector.job_id == job.id).order_by(JobVector.index)).all()
        assert [(v.index, v.label, v.vector) for v in stored] == [(i, f"v{i}", vectors[i]) for i in range(10)]
        chunks = s.scalars(select(Chunk).where(Chunk.job_id == job.id).order_by(Chunk.index)).all()
        assert [c.items for c in chunks] == [[[i] for i in range(5)], [[i] for i in range(5, 10)]]  # even
        interpret_key = job.batch_key
    assert message_chunk_ids(queued_messages(redis_url, model)) == [c.id for c in chunks]
    # the same engine settings as an interpret job, but never the same batch key: no cross-kind batches
    with server.client() as http:
        other = http.post("/v1/jobs", json={"model": model, "prompts": ["a cat"]}).json()
    with session_scope(database_url) as s:
        assert s.get(Job, other["id"]).batch_key != interpret_key


def test_a_vectors_job_points_at_its_results_not_at_interpretations(env, server):
    """A vectors job has no interpretations: its links advertised /interpretations, which answered an empty page for
    ever (and so did Client.results); now there is no such link and the route says where the rows are."""
    _, _, model = env
    with server.client() as http:
        accepted = http.post("/v1/jobs/vectors", json={"model": model, "vectors": [vec()]}).json()
        status = http.get(accepted["link"]).json()
        refused = [http.get(f"/v1/jobs/{accepted['id']}/interpretations", params=params)
                   for params in ({}, {"format": "csv"})]
        interpret = http.post("/v1/jobs", json={"model": model, "prompts": ["a cat"]}).json()
    assert accepted["links"]["interpretations"] is None and status["links"]["interpretations"] is None
    assert accepted["links"]["results"].endswith(f"/v1/jobs/{accepted['id']}/results")
    for resp in refused:
        assert resp.status_code == 409, resp.text
        assert resp.json() == {"detail": f"job {accepted['id']} is a vectors job: it has no interpretations; its rows "
                                         f"are at GET /v1/jobs/{accepted['id']}/results (Client.rows)",
                               "field": "job_id"}
    assert interpret["links"]["interpretations"].endswith(f"/v1/jobs/{interpret['id']}/interpretations")


def test_expressions_are_validated_against_the_card_and_stored(env, server):
    database_url, _, model = env
    expression = {"terms": [term(coef=1.0), term(prompt="the dog ran to the park", coef=-0.5)]}
    with server.client() as http:
        resp = http.post("/v1/jobs/vectors", json={"model": model, "expressions": [expression], "labels": ["diff"]})
    assert resp.status_code == 202, resp.text
    with session_scope(database_url) as s:
        (stored,) = s.scalars(select(JobVector)).all()
    assert stored.vector is None and stored.label == "diff"
    assert stored.expression == {"terms": [term(coef=1.0), term(prompt="the dog ran to the park", coef=-0.5)]}


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_uploaded_vectors_are_stored(env, server, suffix):
    database_url, _, model = env
    array = np.arange(3 * HIDDEN, dtype=np.float32).reshape(3, HIDDEN) / 100
    if suffix == ".npy":
        data = npy(array)
    else:
        from safetensors.numpy import save

        data = save({"probe": array})
    with server.client() as http:
        resp = http.post("/v1/jobs/vectors/upload", files={"file": ("v" + suffix, data)},
                         data={"options": json.dumps({"model": model, "labels": ["a", "b", "c"]})})
    assert resp.status_code == 202, resp.text
    assert resp.json()["kind"] == "vectors" and resp.json()["total"] == 3
    with session_scope(database_url) as s:
        stored = s.scalars(select(JobVector).order_by(JobVector.index)).all()
    assert [v.label for v in stored] == ["a", "b", "c"]
    assert np.allclose([v.vector for v in stored], array)


BAD_JSON = [
    ("empty vector list", lambda m: {"model": m, "vectors": []}),
    ("empty vector", lambda m: {"model": m, "vectors": [[]]}),
    ("hidden size too small", lambda m: {"model": m, "vectors": [vec(n=HIDDEN - 1)]}),
    ("hidden size too large", lambda m: {"model": m, "vectors": [vec(n=HIDDEN + 1)]}),
    ("ragged vectors", lambda m: {"model": m, "vectors": [vec(), vec(n=3)]}),
    ("a vector is a number", lambda m: {"model": m, "vectors": [0.5] * HIDDEN}),
    ("nested too deep", lambda m: {"model": m, "vectors": [[vec()]]}),
    ("a string value", lambda m: {"model": m, "vectors": [["0.5"] * HIDDEN]}),
    ("a boolean value", lambda m: {"model": m, "vectors": [[True] * HIDDEN]}),
    ("a null value", lambda m: {"model": m, "vectors": [[None] * HIDDEN]}),
    ("a negative value past float32 in a second vector", lambda m: {"model": m, "vectors": [vec(), vec(-1e308)]}),
    ("too many vectors", lambda m: {"model": m, "vectors": [vec()] * 21}),
    ("labels count", lambda m: {"model": m, "vectors": [vec(), vec()], "labels": ["only one"]}),
    ("label not a string", lambda m: {"model": m, "vectors": [vec()], "labels": [3]}),
    ("label too long", lambda m: {"model": m, "vectors": [vec()], "labels": ["x" * 201]}),
    ("NUL in label", lambda m: {"model": m, "vectors": [vec()], "labels": ["a\x00b"]}),
    ("both vectors and expressions", lambda m: {"model": m, "vectors": [vec()], "expressions": [{"terms": [term()]}]}),
    ("neither vectors nor expressions", lambda m: {"model": m}),
    ("unknown model", lambda m: {"model": "no-such-model", "vectors": [vec()]}),
    ("k past the depth", lambda m: {"model": m, "vectors": [vec()], "k": NUM_LAYERS}),
    ("unknown field", lambda m: {"model": m, "vectors": [vec()], "prompts": ["a cat"]}),
    ("expression without terms", lambda m: {"model": m, "expressions": [{"terms": []}]}),
    ("too many terms", lambda m: {"model": m, "expressions": [{"terms": [term()] * 4}]}),
    ("term layer past the depth", lambda m: {"model": m, "expressions": [{"terms": [term(layer=NUM_LAYERS + 1)]}]}),
    ("term layer negative", lambda m: {"model": m, "expressions": [{"terms": [term(layer=-1)]}]}),
    ("term token past the end", lambda m: {"model": m, "expressions": [{"terms": [term(token=40)]}]}),
    ("term token before the start", lambda m: {"model": m, "expressions": [{"terms": [term(token=-40)]}]}),
    ("term empty prompt", lambda m: {"model": m, "expressions": [{"terms": [term(prompt="")]}]}),
    ("term blank prompt", lambda m: {"model": m, "expressions": [{"terms": [term(prompt="   ")]}]}),
    ("term unknown field", lambda m: {"model": m, "expressions": [{"terms": [{**term(), "code": "1+1"}]}]}),
    ("term layer as a string", lambda m: {"model": m, "expressions": [{"terms": [term(layer="2")]}]}),
    ("term token as a boolean", lambda m: {"model": m, "expressions": [{"terms": [term(token=True)]}]}),
    ("term coef as a string", lambda m: {"model": m, "expressions": [{"terms": [term(coef="2")]}]}),
    # finite in JSON but infinite in the float32 the engine computes in: accepted, then failed by every worker
    ("a value past float32", lambda m: {"model": m, "vectors": [[1e39] + [0.5] * (HIDDEN - 1)]}),
    ("expression as free text", lambda m: {"model": m, "expressions": ['state("a", 2, -1) - state("b", 2, -1)']}),
]


@pytest.mark.parametrize("name, make", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_vectors_are_refused_with_nothing_stored_or_enqueued(env, server, name, make):
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post("/v1/jobs/vectors", json=make(model))
    assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text)
    assert resp.json()["detail"]
    assert_nothing_stored(database_url, redis_url, model)


def test_non_finite_values_are_refused(env, server):
    """JSON has no NaN or Infinity, but Python's encoder writes them and 1e999 overflows to infinity."""
    database_url, redis_url, model = env
    for bad in ("NaN", "Infinity", "-Infinity", "1e999"):
        raw = '{"model": "%s", "vectors": [[%s%s]]}' % (model, bad, ", 0.5" * (HIDDEN - 1))
        with server.client() as http:
            resp = http.post("/v1/jobs/vectors", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 422, (bad, resp.text)
    assert_nothing_stored(database_url, redis_url, model)


def npy_claiming(shape, descr="<f4", body=b"") -> bytes:
    """A .npy file (format 1.0) whose header says `shape` and `descr`, followed by `body` whatever its size."""
    header = ("{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape,)).encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def _safetensors(tensors) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


BAD_FILES = [
    ("pickle .pt", "v.pt", lambda: b"\x80\x04K\x01.", 415, "pickle"),
    ("unknown suffix", "v.csv", lambda: b"0.5,0.5", 415, ".npy or .safetensors"),
    ("npy object array", "v.npy", lambda: npy(np.array([{"a": 1}], dtype=object)), 422, "pickle"),
    ("npy strings", "v.npy", lambda: npy(np.array([["a"] * HIDDEN])), 422, "dtype"),
    ("npy complex", "v.npy", lambda: npy(np.ones((1, HIDDEN), dtype=np.complex64)), 422, "dtype"),
    ("npy booleans", "v.npy", lambda: npy(np.ones((1, HIDDEN), dtype=bool)), 422, "dtype"),
    ("npy 3-D", "v.npy", lambda: npy(np.ones((1, 2, HIDDEN), dtype=np.float32)), 422, "shape"),
    ("npy no rows", "v.npy", lambda: npy(np.ones((0, HIDDEN), dtype=np.float32)), 422, "no vectors"),
    ("npy wrong hidden size", "v.npy", lambda: npy(np.ones((2, HIDDEN + 1), dtype=np.float32)), 422, "hidden size"),
    ("npy NaN", "v.npy", lambda: npy(np.array([[np.nan] * HIDDEN], dtype=np.float32)), 422, "NaN"),
    ("npy header claims exabytes", "v.npy", lambda: npy_claiming((10**12, 10**6), body=b"\0" * 64), 422,
     "header says shape"),
    ("npy header claims fewer bytes", "v.npy", lambda: npy_claiming((1, HIDDEN), body=b"\0" * (4 * HIDDEN + 8)),
     422, "header says shape"),
    ("npy header claims an object dtype", "v.npy", lambda: npy_claiming((1, HIDDEN), descr="|O", body=b"\0" * 8),
     422, "pickle"),
    ("npy truncated", "v.npy", lambda: npy(np.ones((2, HIDDEN), dtype=np.float32))[:-7], 422, ".npy"),
    ("not npy at all", "v.npy", lambda: b"hello, world", 422, ".npy"),
    # numpy.load allocates what the header says before reading: MemoryError (500) or OverflowError (500) before
    ("npy header claims 1e8 rows", "v.npy",
     lambda: npy(np.ones((1, HIDDEN), np.float32)).replace(b"(1, %d)" % HIDDEN, b"(100000000, %d)" % HIDDEN), 422,
     "header says"),
    ("npy header past int64", "v.npy",
     lambda: npy(np.ones((1, HIDDEN), np.float32)).replace(b"(1, %d)" % HIDDEN, b"(%d, %d)" % (2**70, HIDDEN)), 422,
     "header says"),
    ("npy float64 past float32", "v.npy", lambda: npy(np.full((1, HIDDEN), 1e300)), 422, "float32"),
    ("empty file", "v.npy", lambda: b"", 422, "empty"),
    ("too large", "v.npy", lambda: npy(np.ones((40, HIDDEN), dtype=np.float64)), 413, "larger than"),
    ("too many vectors", "v.npy", lambda: npy(np.ones((21, HIDDEN), dtype=np.float16)), 413, "at most 20"),
    ("safetensors two tensors", "v.safetensors",
     lambda: _safetensors({"a": np.ones((1, HIDDEN), np.float32), "b": np.ones((1, HIDDEN), np.float32)}), 422,
     "tensor"),
    ("safetensors garbage", "v.safetensors", lambda: b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", 422,
     ".safetensors"),
    ("safetensors infinite", "v.safetensors",
     lambda: _safetensors({"a": np.full((1, HIDDEN), np.inf, np.float32)}), 422, "infinite"),
]


@pytest.mark.parametrize("name, filename, make, code, says", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_uploads_are_refused_with_nothing_stored_or_enqueued(env, server, name, filename, make, code, says):
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post("/v1/jobs/vectors/upload", files={"file": (filename, make())},
                         data={"options": json.dumps({"model": model})})
    assert resp.status_code == code, (name, resp.status_code, resp.text)
    assert says in resp.json()["detail"], resp.json()
    assert_nothing_stored(database_url, redis_url, model)


@pytest.mark.parametrize("options", ['{"model": 3}', "[1, 2]", "not json", '{"vectors": [[0.5]]}',
                                     '{"labels": ["one", "two"]}',
                                     "[" * 100_000 + "]" * 100_000], ids=lambda options: options[:24])
def test_bad_upload_options_are_refused(env, server, options):
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post("/v1/jobs/vectors/upload", files={"file": ("v.npy", npy(np.ones((1, HIDDEN), np.float32)))},
                         data={"options": options})
    assert resp.status_code == 422, resp.text
    assert_nothing_stored(database_url, redis_url, model)


@pytest.mark.parametrize("options", ['{"model": "M", "labels": [NaN]}', '{"model": "M", "k": Infinity}',
                                     '{"model": "M", "labels": ["\\ud800"]}'])
def test_upload_options_are_read_as_strictly_as_json_bodies(env, server, options):
    """The options form field is JSON too: non-finite numbers and lone surrogates are a 422 as in any body."""
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post("/v1/jobs/vectors/upload", files={"file": ("v.npy", npy(np.ones((1, HIDDEN), np.float32)))},
                         data={"options": options.replace('"M"', json.dumps(model))})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"]
    assert_nothing_stored(database_url, redis_url, model)


@pytest.mark.parametrize("form", ["json", "upload"])
def test_vectors_bodies_past_the_small_default_limit_are_taken(env, form):
    """The vectors routes have body limits of their own (api.limits): a job of many vectors is more than the 1 MiB
    every other small route gets."""
    database_url, redis_url, model = env
    n = 12_000  # 12,000 x 16 numbers: about 2.3 MB as JSON, 0.77 MB as .npy
    settings = settings_for(database_url, redis_url, max_vectors_per_job=n, max_vector_upload_bytes=4 << 20,
                            max_body_bytes=256 << 10)
    array = np.random.default_rng(0).standard_normal((n, HIDDEN)).astype(np.float32)
    with live_server(settings) as srv, srv.client() as http:
        if form == "json":
            resp = http.post("/v1/jobs/vectors", json={"model": model, "vectors": array.tolist()})
        else:
            resp = http.post("/v1/jobs/vectors/upload", files={"file": ("v.npy", npy(array))},
                             data={"options": json.dumps({"model": model})})
    assert resp.status_code == 202, resp.text[:300]
    assert count(database_url, JobVector) == n
