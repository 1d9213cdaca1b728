"""Fuzz the API from its own OpenAPI spec over real HTTP: whatever schemathesis sends, never a 5xx.

Schemathesis generates standard JSON only: no `NaN`/`Infinity` and no lone surrogates (it leaves category Cs out
even with `codec=None`). Python's json accepts both, so a third of the JSON bodies get one leaf (a value anywhere
in the body, or a key) replaced by a non-finite float (`st.floats(allow_nan=True, allow_infinity=True)`) or a
string holding a lone surrogate (`st.characters(categories=["Cs"])`); `json.dumps` sends them as `NaN`,
`Infinity` and `"\ud800"`. What the generators cannot reach (booleans in numeric fields, huge and non-ASCII ids,
bad upload lines) is written out per class over every route in `test_api_bad_input.py`.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import uuid

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from tests import services
from tests.apisupport import flush_model_queue, live_server, prepare_database, settings_for

pytestmark = pytest.mark.slow

MAX_EXAMPLES = int(os.environ.get("SELFIE_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fuzz_server(request, tmp_path_factory, redis_url):
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'selfie.db'}", None
    else:
        admin = services.postgres_admin_url()
        if admin is None:
            pytest.skip("no PostgreSQL server")
        url = services.create_postgres_database(admin)
        drop = (admin, url)
    model = "fuzz-" + uuid.uuid4().hex[:8]
    prepare_database(url, model=model)
    # The fuzzed model is the default one, so bodies without a model reach the checks against the card.
    with live_server(settings_for(url, redis_url, default_model=model)) as server:
        yield server
    flush_model_queue(redis_url, model)
    if drop is not None:
        from selfie_jobs.db import get_engine

        get_engine.cache_clear()
        services.drop_postgres_database(*drop)


NON_FINITE = st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: x != x or x in (float("inf"), -float("inf")))
SURROGATE_TEXT = st.builds(lambda a, b, c: a + b + c, st.text(max_size=3), st.characters(categories=["Cs"]),
                           st.text(max_size=3))


def _leaf_paths(value, path=()):
    """Paths to every scalar of a JSON body, and to every object (for a new key)."""
    if isinstance(value, dict):
        yield (*path, None)  # a key of this object
        for key, sub in value.items():
            yield from _leaf_paths(sub, (*path, key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _leaf_paths(sub, (*path, i))
    else:
        yield path


def _mutate(data, body):
    """`body` with one leaf (or a new key) replaced by a non-finite number or a string with a lone surrogate."""
    paths = list(_leaf_paths(body))
    if not paths or not isinstance(body, (dict, list)):
        return body
    path = data.draw(st.sampled_from(paths))
    bad = data.draw(st.one_of(NON_FINITE, SURROGATE_TEXT))
    node = body
    for key in path[:-1]:
        node = node[key]
    if path and path[-1] is None:
        node[data.draw(SURROGATE_TEXT)] = bad if not isinstance(bad, str) else 1
    elif path:
        node[path[-1]] = bad
    return body


def test_no_server_errors(fuzz_server):
    """Every operation of the spec, MAX_EXAMPLES valid and MAX_EXAMPLES schema-violating requests each; a third of
    the JSON bodies carry a non-finite number or a lone surrogate."""
    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    spec = httpx.get(fuzz_server.url + "/openapi.json").json()
    assert len(operations) == sum(len(ops) for ops in spec["paths"].values())  # every route is fuzzed
    failures, calls, mutated = [], [], []
    for operation, mode in itertools.product(operations, list(schemathesis.GenerationMode)):

        @given(case=operation.as_strategy(generation_mode=mode), data=st.data(), mutate=st.integers(0, 2))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def run(case, data, mutate):
            if mutate == 0 and case.media_type == "application/json" and isinstance(case.body, (dict, list)):
                # a copy: the generated body may be shared with hypothesis' record of the example
                body = _mutate(data, copy.deepcopy(case.body))
                mutated.append(case.formatted_path)
                # sent as Python's json writes it (NaN, Infinity, "\ud800" escapes); the case's own transport
                # encodes text as UTF-8 and cannot carry a lone surrogate
                # (with requests, as the case's transport: it sends the odd headers schemathesis generates)
                response = requests.request(case.method, fuzz_server.url + case.formatted_path, params=case.query,
                                            headers={**(case.headers or {}), "content-type": "application/json"},
                                            data=json.dumps(body).encode(), timeout=30)
            else:
                response = case.call(base_url=fuzz_server.url, timeout=30)
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, case.query, case.body, response.status_code,
                                 response.text[:300]))
            elif "application/json" in response.headers.get("content-type", ""):
                try:
                    response.json()  # an answer that echoes bad input must still be JSON
                except ValueError:
                    failures.append((case.method, case.formatted_path, case.body, "not JSON", response.text[:300]))
            assert response.status_code < 500

        try:
            run()
        except AssertionError:
            pass  # recorded; go on with the other operations so one run reports them all
        except Unsatisfiable:
            assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing to violate (no parameters, no body)
    assert not failures, failures
    assert len(mutated) >= 10, mutated  # the non-finite and surrogate bodies were sent
    # the run really exercised the app: accepted jobs, refused bodies, unknown jobs
    assert len(calls) >= len(operations) * 10
    assert {202, 422, 404} <= set(calls), sorted(set(calls))
