"""Bad values on every route, over real HTTP: what schemathesis does not generate, written out by class.

Each class is applied to every operation the OpenAPI spec lists (a new route is covered without a new test): the
non-finite JSON tokens Python's json accepts (`NaN`, `Infinity`, `-Infinity`, `1e999`) and lone UTF-16 surrogates
in every field of every JSON body, booleans in every numeric field, huge and non-ASCII-digit ids in every path and
query parameter. Every answer is a 4xx whose body is valid JSON, and nothing is stored.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from tests import services
from tests.apisupport import flush_model_queue, live_server, prepare_database, settings_for

NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999")
BAD_IDS = (str(2**63), str(2**70), "9" * 40, "١٢٣", "１２", "²", "-0", "1e3", "0x10", " 1")
SURROGATE = '"\\ud800"'
SENTINEL = "__SENTINEL__"

#: A body each JSON operation accepts (or refuses for reasons other than types): the base the cases mutate.
BASE_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/jobs"): {"prompts": ["the cat"]},
    ("post", "/v1/jobs/vectors"): {"vectors": [[0.5] * 16], "labels": ["a"]},  # the tiny card's hidden size
    ("post", "/v1/jobs/lenses"): {"prompts": ["the cat"], "top_k": 3, "lenses": ["logit"]},
    ("post", "/v1/jobs/generate"): {"prompts": ["the cat"], "chat": False, "max_new_tokens": 4},  # no chat template
    ("post", "/v1/jobs/supervised"): {"source": {"prompt": "the cat", "layer": 1, "token": -1},
                                      "target_vector": [0.5] * 16, "epochs": 2},
    ("post", "/v1/jobs/reinforce"): {"prompt": "the cat", "layer": 1, "judge": {"type": "keywords", "words": ["cat"]},
                                     "epochs": 2, "max_new_tokens": 8},
    ("post", "/v1/audits"): {"name": "a", "prompt_set": "ethical_decisions",
                             "detectors": [{"kind": "keywords", "words": ["cat"]}]},
    ("patch", "/v1/audits/{audit_id}"): {},
}
BASE_BODIES[("post", "/v1/edits/supervised")] = BASE_BODIES[("post", "/v1/jobs/supervised")]
BASE_BODIES[("post", "/v1/edits/reinforce")] = BASE_BODIES[("post", "/v1/jobs/reinforce")]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def bad_input_server(request, tmp_path_factory, redis_url):
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path_factory.mktemp('bad') / 'selfie.db'}", None
    else:
        admin = services.postgres_admin_url()
        if admin is None:
            pytest.skip("no PostgreSQL server")
        url = services.create_postgres_database(admin)
        drop = (admin, url)
    model = "bad-" + uuid.uuid4().hex[:8]
    prepare_database(url, model=model)
    with live_server(settings_for(url, redis_url, default_model=model)) as server:
        http = server.client()
        audit = http.post("/v1/audits", json=dict(BASE_BODIES[("post", "/v1/audits")], name="existing"))
        assert audit.status_code == 201, audit.text
        server.audit_id = audit.json()["id"]
        server.database_url = url
        yield server
    flush_model_queue(redis_url, model)
    if drop is not None:
        from selfie_jobs.db import get_engine

        get_engine.cache_clear()
        services.drop_postgres_database(*drop)


def _spec(server) -> dict[str, Any]:
    return server.app.openapi()


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _leaves(spec, schema, path=(), depth=0):
    """(path, JSON type) of every scalar a body schema allows, through objects, arrays, tuples and unions."""
    schema = _resolve(spec, schema)
    if depth > 8:
        return
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", []):
        yield from _leaves(spec, branch, path, depth + 1)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        for name, sub in schema.get("properties", {}).items():
            yield from _leaves(spec, sub, (*path, name), depth + 1)
    elif kind == "array":
        for i, sub in enumerate(schema.get("prefixItems", [])):
            yield from _leaves(spec, sub, (*path, i), depth + 1)
        if "items" in schema and "prefixItems" not in schema:
            yield from _leaves(spec, schema["items"], (*path, 0), depth + 1)
    elif kind in ("integer", "number", "string", "boolean"):
        yield path, kind, schema


def _with(base: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    """`base` with `value` at `path` (containers made or replaced on the way; lists padded with 0)."""
    body = copy.deepcopy(base)
    node: Any = body
    for key, nxt in zip(path, (*path[1:], None)):
        fresh: Any = value if nxt is None else ([] if isinstance(nxt, int) else {})
        if isinstance(key, int):
            while len(node) <= max(key, 1):  # two at least: a pair's other half
                node.append(0)
            if nxt is None or not isinstance(node[key], type(fresh)):
                node[key] = fresh
        else:
            if nxt is None or not isinstance(node.get(key), type(fresh)):
                node[key] = fresh
        node = node[key]
    return body


def _along(leaf: tuple, loc: list) -> bool:
    """Whether an error's `loc` runs through `leaf` (pydantic adds union branch names between the steps)."""
    steps = iter(loc)
    return all(any(step == want for step in steps) for want in leaf)


def _json_operations(spec):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                yield method, path, _resolve(spec, content["application/json"]["schema"])


def _url(server, path: str) -> str:
    return path.replace("{audit_id}", str(server.audit_id))


def _stored_counts(url: str) -> dict[str, int]:
    from selfie_jobs.audit_models import Audit, PromptSet
    from selfie_jobs.db import session_scope
    from selfie_jobs.models import Job

    with session_scope(url) as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m)) for m in (Job, Audit, PromptSet)}


def _refused(res, case) -> dict[str, Any]:
    assert 400 <= res.status_code < 500, (case, res.status_code, res.text[:300])
    return res.json()  # valid JSON (an error echoing a NaN or a surrogate used to fail to encode: a 500)


def test_every_json_body_operation_has_a_base_body(bad_input_server):
    ops = {(m, p) for m, p, _ in _json_operations(_spec(bad_input_server))}
    assert ops == set(BASE_BODIES), "give each JSON operation a base body here"


def test_non_finite_numbers_and_surrogates_in_any_field_are_refused(bad_input_server):
    """Every scalar field of every JSON body (numbers, strings, booleans alike), with each non-finite token and a
    lone surrogate in its place, and in an extra field and a key; nothing stored."""
    server = bad_input_server
    spec = _spec(server)
    before = _stored_counts(server.database_url)
    cases = 0
    with server.client() as http:
        for method, path, schema in _json_operations(spec):
            base = BASE_BODIES[(method, path)]
            paths = {leaf[0] for leaf in _leaves(spec, schema)}
            paths |= {("detectors", 0, "extra")} if "audits" in path else set()  # an extra field a detector keeps
            for leaf in sorted(paths, key=str):
                text = json.dumps(_with(base, leaf, SENTINEL))
                for token in (*NON_FINITE, SURROGATE):
                    case = (method, path, leaf, token)
                    res = http.request(method, _url(server, path), content=text.replace(f'"{SENTINEL}"', token),
                                       headers={"content-type": "application/json"})
                    detail = json.dumps(_refused(res, case))
                    assert res.status_code == 422, case
                    assert "surrogate" in detail if token == SURROGATE else "finite" in detail, (case, detail)
                    cases += 1
            key = json.dumps(dict(base, **{SENTINEL: 1})).replace(f'"{SENTINEL}"', SURROGATE)
            _refused(http.request(method, _url(server, path), content=key,
                                  headers={"content-type": "application/json"}), (method, path, "key"))
    assert cases > 100
    assert _stored_counts(server.database_url) == before


def test_integers_past_the_digit_limit_in_any_body_are_refused(bad_input_server):
    """An integer of more digits than Python converts (4300) in a field or an extra field of every JSON body: a
    422 saying so (json.loads raised a plain ValueError: '400 There was an error parsing the body'), nothing stored."""
    server = bad_input_server
    before = _stored_counts(server.database_url)
    huge = "9" * 5000
    with server.client() as http:
        for method, path, _ in _json_operations(_spec(server)):
            base = BASE_BODIES[(method, path)]
            for leaf in (("priority",), ("extra",)):
                text = json.dumps(dict(base, **{leaf[0]: SENTINEL})).replace(f'"{SENTINEL}"', huge)
                res = http.request(method, _url(server, path), content=text,
                                   headers={"content-type": "application/json"})
                body = _refused(res, (method, path, leaf))
                assert res.status_code == 422 and "5000 digits" in json.dumps(body), (method, path, leaf, res.text)
    assert _stored_counts(server.database_url) == before


def test_booleans_are_not_numbers_in_any_body(bad_input_server):
    """`true`/`false` in every integer or number field (including a template's placeholder 0) is a 422 naming
    that value, never read as 1 or 0."""
    server = bad_input_server
    spec = _spec(server)
    before = _stored_counts(server.database_url)
    checked = []
    with server.client() as http:
        for method, path, schema in _json_operations(spec):
            for leaf, kind, leaf_schema in _leaves(spec, schema):
                if kind not in ("integer", "number"):
                    continue
                # false is the placeholder's lookalike (0); true the lookalike of 1 elsewhere
                value = False if leaf_schema.get("const") == 0 else True
                res = http.request(method, _url(server, path), json=_with(BASE_BODIES[(method, path)], leaf, value))
                body = _refused(res, (method, path, leaf))
                assert res.status_code == 422, (method, path, leaf, res.text)
                assert any(e.get("input") is value and _along(leaf, e["loc"][1:])
                           for e in body["detail"]), (method, path, leaf, body)
                checked.append((path, leaf))
    assert ("/v1/jobs", ("k",)) in checked and ("/v1/jobs", ("template", "parts", 0)) in checked
    assert _stored_counts(server.database_url) == before


def test_huge_and_non_ascii_ids_in_every_parameter(bad_input_server):
    """Every path and query parameter (ids, cursors, names alike) given huge numbers and non-ASCII digits, and
    the audit's prompt set (an id or a name): 4xx, a 404 where it names a row."""
    server = bad_input_server
    spec = _spec(server)
    before = _stored_counts(server.database_url)
    with server.client() as http:
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                for param in op.get("parameters", []):
                    for bad in BAD_IDS:
                        url = _url(server, path).replace("{job_id}", "0" * 32).replace("{name}", "x")
                        url = url.replace("{run_id}", "1").replace("{prompt_set_id}", "1")
                        params = {}
                        if param["in"] == "path":
                            url = _url(server, path).replace("{" + param["name"] + "}", bad)
                            url = url.replace("{job_id}", "0" * 32).replace("{run_id}", "1").replace("{name}", "x")
                        else:
                            params[param["name"]] = bad
                        kwargs = {"json": BASE_BODIES.get((method, path), {})} if "requestBody" in op else {}
                        res = http.request(method, url, params=params, **kwargs)
                        assert res.status_code < 500, (method, path, param["name"], bad, res.text[:300])
                        res.json()
        for bad in BAD_IDS + ("1" * 19,):
            res = http.post("/v1/audits", json=dict(BASE_BODIES[("post", "/v1/audits")], name="n", prompt_set=bad))
            assert res.status_code == 404, (bad, res.text)  # not an id of a set: a name no set has
    assert _stored_counts(server.database_url) == before


def test_a_regex_detector_whose_repeats_expand_to_gigabytes_is_refused(bad_input_server):
    """A 12-byte pattern, a{999999999}: regex.compile in the API grew it to 18 GB until the kernel killed it."""
    server = bad_input_server
    before = _stored_counts(server.database_url)
    with server.client() as http:
        for patterns in (["a{999999999}"], ["((a{1000}){1000}){1000}"]):
            body = dict(BASE_BODIES[("post", "/v1/audits")], name="r",
                        detectors=[{"kind": "regex", "patterns": patterns}])
            res = http.post("/v1/audits", json=body)
            assert res.status_code == 422 and "expand to more than" in res.text, res.text
            res = http.patch(f"/v1/audits/{server.audit_id}", json={"detectors": body["detectors"]})
            assert res.status_code == 422 and "expand to more than" in res.text, res.text
    assert _stored_counts(server.database_url) == before


def test_audit_schedules_that_never_fire_are_refused(bad_input_server):
    with bad_input_server.client() as http:
        for cron in ("* * * * * *", "0 0 1 1 * 2030", "*/99999999999999999999 * * * *", "0 0 001 * *"):
            res = http.post("/v1/audits", json=dict(BASE_BODIES[("post", "/v1/audits")], name="c", schedule=cron))
            assert res.status_code == 422 and "five fields" in res.text, res.text
        for cron in ("0 0 30 2 *", "0 0 31 4 *", "0 0 31 2,4,6 *"):
            res = http.post("/v1/audits", json=dict(BASE_BODIES[("post", "/v1/audits")], name="c", schedule=cron))
            assert res.status_code == 422 and "never fires" in res.text, res.text
            res = http.patch(f"/v1/audits/{bad_input_server.audit_id}", json={"schedule": cron})
            assert res.status_code == 422 and "never fires" in res.text, res.text
        assert http.get(f"/v1/audits/{bad_input_server.audit_id}").json()["schedule"] is None


def test_prompt_set_lines_that_cannot_be_stored_are_refused_with_their_line(bad_input_server):
    """A lone surrogate (key or value), a non-finite number or metadata nested past the limit: 422 naming the line,
    and no prompt set stored."""
    server = bad_input_server
    good = b'{"prompt": "the cat"}\n'
    lines = {
        "surrogate key": b'{"prompt": "x", "\\ud800": 1}\n',
        "surrogate value": b'{"prompt": "x", "tag": "a\\udfff"}\n',
        "surrogate prompt": b'"\\ud83d"\n',
        "nan": b'{"prompt": "x", "score": NaN}\n',
        "deep": b'{"prompt": "x", "m": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
        "nested": b'{"prompt": "x", "m": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}\n",
        # past Python's 4300-digit limit for int(): json.loads raised a plain ValueError, answered 500
        "huge integer": b'{"prompt": "x", "m": ' + b"9" * 5000 + b"}\n",
    }
    before = _stored_counts(server.database_url)
    with server.client() as http:
        for what, line in lines.items():
            res = http.post("/v1/prompt-sets", files={"file": ("p.jsonl", good * 2 + line, "text/plain")},
                            data={"name": f"bad-{what}"})
            assert res.status_code == 422, (what, res.text)
            assert res.json()["detail"].startswith("line 3:"), (what, res.text)
        assert http.post("/v1/prompt-sets", files={"file": ("p.jsonl", good, "text/plain")},
                         data={"name": "\udc80".encode("utf-8", "surrogatepass").decode("latin-1")}).status_code < 500
    after = _stored_counts(server.database_url)
    assert after["prompt_sets"] - before["prompt_sets"] <= 1  # at most the last (a valid file under a mangled name)


def test_bad_system_prompts_and_grounding_thresholds_are_refused(bad_input_server):
    """A preset's system prompt past 4000 characters, blank, beside `parts`, or for a model whose chat template
    takes none, and a grounding threshold outside 0..1: 422 naming the field, nothing stored."""
    from selfie_jobs.cards import write_model_card
    from selfie_jobs.db import session_scope
    from tests.apisupport import tiny_card

    server = bad_input_server
    plain = "nosys-" + uuid.uuid4().hex[:8]
    with session_scope(server.database_url) as session:  # a card whose presets take no system prompt (Gemma-like)
        write_model_card(session, plain, tiny_card(name=plain, presets={
            "summarize": {"parts": ["<start_of_turn>user\n", 0, "<end_of_turn>\n"], "num_tokens": 12,
                          "takes_system": False}}))
    before = _stored_counts(server.database_url)
    cases = [
        ({"template": {"preset": "summarize", "system": "x" * 4001}}, "template", "4000"),
        ({"template": {"preset": "summarize", "system": "  \n"}}, "template", "blank"),
        ({"template": {"parts": ["a ", 0, " b"], "system": "Be brief."}}, "template", "goes with a preset"),
        ({"template": {"preset": "summarize", "system": 7}}, "template", "string"),
        ({"grounding": {"min_mean_relevancy": 1.5}}, "grounding", "less than or equal to 1"),
        ({"grounding": {"min_mean_relevancy": -0.1}}, "grounding", "greater than or equal to 0"),
        ({"grounding": {"threshold": 0.1}}, "grounding", "Extra inputs"),
        ({"model": plain, "template": {"preset": "summarize", "system": "Be brief."}}, "template.system",
         "takes no system prompt"),
    ]
    with server.client() as http:
        for extra, field, why in cases:
            res = http.post("/v1/jobs", json={"prompts": ["the cat"], **extra})
            _refused(res, extra)
            assert res.status_code == 422 and why in res.text and field in res.text, (extra, res.text[:400])
        ok = http.post("/v1/jobs", json={"prompts": ["the cat"], "template": {"system": "Be brief."},
                                         "grounding": {"min_mean_relevancy": 0}})
        assert ok.status_code == 202, ok.text
        spec = http.get(f"/v1/jobs/{ok.json()['id']}").json()["spec"]
        assert spec["template"] == {"preset": "summarize", "system": "Be brief."}  # the card's default preset
        assert spec["grounding"] == {"min_mean_relevancy": 0.0}
    assert _stored_counts(server.database_url) == dict(before, jobs=before["jobs"] + 1)


def _cursor(raw: str) -> str:
    import base64

    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


#: Each paging route and order: its cursor's kind and the JSON of a value that fits each of its keys.
_PAGED: list[tuple[str, dict[str, str], str, list[str]]] = [
    ("/v1/jobs", {}, "jobs", ['"2026-01-01T00:00:00+00:00"', '"' + "0" * 32 + '"']),
    *(("/v1/jobs/{job}/interpretations", {"sort": sort}, "interp:" + sort, fits)
      for sort, fits in [("position", ["0", "0", "0"]), ("layer", ["0", "0", "0"]), ("-layer", ["0", "0", "0"]),
                         ("token", ["0", "0", "0"]), ("relevancy", ["0.5", "1"]), ("-relevancy", ["0.5", "1"]),
                         ("created", ['"2026-01-01T00:00:00"', "1"])]),
    ("/v1/jobs/{job}/interpretations", {"format": "csv"}, "interp:position", ["0", "0", "0"]),
    ("/v1/jobs/{job}/interpretations", {"format": "csv", "sort": "created"}, "interp:created",
     ['"2026-01-01T00:00:00"', "1"]),
    ("/v1/jobs/{job}/results", {}, "interp:position", ["0", "0", "0"]),
]


def _tampered(fits: list[str]) -> list[list[str]]:
    """Cursor values with one of them changed to a lone surrogate, a non-finite number, or a value of another type
    (text for a number, a huge or fractional number for an integer, a number for text)."""
    out = [["NaN", "Infinity", "-Infinity"][: len(fits)] + fits[3:], ['"a"', '"b"', '"c"'][: len(fits)]]
    for i, fit in enumerate(fits):
        wrong = ['"\\ud800"', "NaN", "-Infinity", "null", "true", "[]"]
        wrong += ["0", "1.5"] if fit.startswith('"') else ['"x"'] + (["1e308", "1.5"] if "." not in fit else [])
        out += [fits[:i] + [w] + fits[i + 1:] for w in wrong]
    return out


def test_tampered_paging_cursors_are_refused_on_every_route_and_order(bad_input_server):
    """A cursor comes back from the client: one edited to a lone surrogate, a non-finite number or a value of the
    wrong type for its key is a 400 "malformed cursor", not a 500 and not an empty last page."""
    http = bad_input_server.client()
    job = http.post("/v1/jobs", json=BASE_BODIES[("post", "/v1/jobs")])
    assert job.status_code == 202, job.text
    seen = []
    for path, params, kind, fits in _PAGED:
        url = path.format(job=job.json()["id"])
        fine = http.get(url, params={**params, "cursor": _cursor(f'["{kind}",[{",".join(fits)}]]')})
        assert fine.status_code == 200, (url, params, fine.text)  # the untampered shape is a cursor
        for values in _tampered(fits):
            raw = f'["{kind}",[{",".join(values)}]]'
            res = http.get(url, params={**params, "cursor": _cursor(raw)})
            seen.append((url, params, raw, res.status_code, res.text[:80]))
            assert res.status_code == 400 and res.json()["detail"] == "malformed cursor", seen[-1]
