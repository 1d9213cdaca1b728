"""Search across results (GET /v1/search, selfie_jobs.search) on SQLite (FTS5) and PostgreSQL (GIN tsvector), over
real HTTP: a key sees only its own jobs' results, admins every one; words, phrases, filters and pages; user text
never reaches the database as query syntax; the index follows inserts, updates and deletes in the writing
transaction, and the migration indexes the rows stored before it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, func, select, text, update

from selfie_jobs.auth import create_key
from selfie_jobs.db import get_engine, session_scope
from selfie_jobs.models import Chunk, Interpretation, Job, VectorInterpretation
from tests.apisupport import live_server, prepare_database, settings_for

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def add_job(session, owner: int | None, texts: list[str], *, model: str = "tiny", kind: str = "interpret",
            start: datetime = T0, audit_run: int | None = None) -> str:
    job = Job(owner_key_id=owner, model=model, kind=kind, spec={}, batch_key="k", total=len(texts),
              audit_run_id=audit_run, created_at=start)
    session.add(job)
    session.flush()
    chunk = Chunk(job_id=job.id, index=0, model=model, batch_key="k", items=[], size=len(texts))
    session.add(chunk)
    session.flush()
    common = {"job_id": job.id, "token_ids": [], "relevancy": [], "mean_relevancy": 0.5, "chunk_id": chunk.id,
              "engine_run_id": "r", "worker": "w", "model": model}
    for i, body in enumerate(texts):
        at = start + timedelta(minutes=i)
        if kind == "interpret":
            # judged grounded on even layers, not on odd ones (a repetition), not judged on the fourth
            grounded = None if i == 3 else i % 2 == 0
            session.add(Interpretation(prompt_index=0, layer=i, token=1, source_token="x", text=body, created_at=at,
                                       grounded=grounded, ungrounded_reason="repetition" if grounded is False else None,
                                       **common))
        else:
            session.add(VectorInterpretation(vector_index=i, label=f"v{i}", norm=1.0, text=body, created_at=at,
                                             **common))
    session.flush()
    return job.id


@pytest.fixture
def world(database_url, redis_url):
    """alice and bob (plain keys) and root (admin), each with results that mention 'password'."""
    prepare_database(database_url)
    with session_scope(database_url) as s:
        alice_row, alice = create_key(s, "alice")
        bob_row, bob = create_key(s, "bob")
        _, root = create_key(s, "root", admin=True)
        s.flush()
        jobs = {
            "alice": add_job(s, alice_row.id, ["the password is secret", "a tower in paris", "Password reset",
                                               "no match here"]),
            "alice_vec": add_job(s, alice_row.id, ["a password vector", "plain words"], kind="vectors",
                                 start=T0 + timedelta(hours=1)),
            "alice_other_model": add_job(s, alice_row.id, ["password on another model"], model="other",
                                         start=T0 + timedelta(days=2), audit_run=7),
            "bob": add_job(s, bob_row.id, ["bob's password leaked", "the explosive tower"],
                           start=T0 + timedelta(days=1)),
        }
    settings = settings_for(database_url, redis_url, auth_enabled=True, rate_limit_per_minute=10_000)
    with live_server(settings) as server:
        yield server, {"alice": alice, "bob": bob, "root": root}, jobs
    get_engine.cache_clear()


def hits(server, key, **params):
    with server.client(key) as http:
        resp = http.get("/v1/search", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def texts(page) -> list[str]:
    return [h["text"] for h in page["items"]]


def test_a_key_finds_only_its_own_results_and_an_admin_every_one(world):
    server, keys, jobs = world
    alice = texts(hits(server, keys["alice"], q="password"))
    # newest first, across interpretations and vector interpretations; case-insensitive
    assert alice == ["password on another model", "a password vector", "Password reset", "the password is secret"]
    assert texts(hits(server, keys["bob"], q="password")) == ["bob's password leaked"]
    assert texts(hits(server, keys["bob"], q="secret")) == []  # alice's word: never in bob's answer
    assert texts(hits(server, keys["bob"], q="password", job=jobs["alice"])) == []
    everyone = texts(hits(server, keys["root"], q="password"))
    assert sorted(everyone) == sorted(alice + ["bob's password leaked"])
    with server.client() as http:
        assert http.get("/v1/search", params={"q": "password"}).status_code == 401


def test_words_phrases_and_filters(world):
    server, keys, jobs = world
    root = keys["root"]
    assert texts(hits(server, root, q="tower paris")) == ["a tower in paris"]  # every word must occur
    assert sorted(texts(hits(server, root, q="tower"))) == ["a tower in paris", "the explosive tower"]
    assert texts(hits(server, root, q='"explosive tower"')) == ["the explosive tower"]
    assert texts(hits(server, root, q='"tower explosive"')) == []  # a phrase keeps its order
    assert texts(hits(server, root, q="password", model="other")) == ["password on another model"]
    assert texts(hits(server, root, q="password", kind="vectors")) == ["a password vector"]
    assert texts(hits(server, root, q="password", audit_run=7)) == ["password on another model"]
    # a layer range leaves out the results that have no layer (vectors)
    assert texts(hits(server, root, q="password", layer_min=2, layer_max=2)) == ["Password reset"]
    window = hits(server, root, q="password", since=(T0 + timedelta(minutes=30)).isoformat(),
                  until=(T0 + timedelta(days=1, hours=1)).isoformat())
    assert texts(window) == ["bob's password leaked", "a password vector"]
    item = hits(server, root, q="reset")["items"][0]
    assert item["created_at"].endswith(("Z", "+00:00"))  # a time with its zone, as every other route gives
    assert item["kind"] == "interpret" and item["job_id"] == jobs["alice"] and item["layer"] == 2
    assert item["vector_index"] is None
    vector = hits(server, root, q="vector")["items"][0]
    assert vector["kind"] == "vectors" and vector["label"] == "v0" and vector["layer"] is None
    assert vector["grounded"] is None and item["grounded"] is True  # layer 2: judged grounded
    # grounded leaves out vectors and rows never judged; /v1/interpretations is the same search
    # (bob's job was stored after the other model's with an earlier time: a source is read in the order stored)
    assert texts(hits(server, root, q="password", grounded="true")) == [
        "bob's password leaked", "password on another model", "Password reset", "the password is secret"]
    assert texts(hits(server, root, q="password", grounded="false")) == []  # every one is on an even layer
    assert texts(hits(server, root, q="tower", grounded="false")) == ["the explosive tower", "a tower in paris"]
    assert texts(hits(server, root, q="here", grounded="true")) == []  # layer 3: not judged
    with server.client(root) as http:
        alias = http.get("/v1/interpretations", params={"q": "tower", "grounded": "false"})
    assert alias.status_code == 200 and texts(alias.json()) == ["the explosive tower", "a tower in paris"]


def test_pages_cover_every_match_once_newest_first(world):
    server, keys, _ = world
    everything = texts(hits(server, keys["root"], q="password", limit=500))
    assert len(everything) == 5
    seen, cursor = [], None
    while True:
        page = hits(server, keys["root"], q="password", limit=2, **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= 2
        seen += texts(page)
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == everything


def test_pages_miss_nothing_when_times_disagree_with_ids(world, database_url):
    """Rows stored by two workers (or hosts whose clocks differ) can have times out of id order: paging still gives
    every match exactly once (the merge keeps each source's id order, which its cursor relies on)."""
    server, keys, jobs = world
    with session_scope(database_url) as s:  # alice's newest interpretation, dated before every other match
        newest = s.scalar(select(func.max(Interpretation.id)).where(Interpretation.job_id == jobs["alice"]))
        s.execute(update(Interpretation).where(Interpretation.id == newest).values(created_at=T0 - timedelta(days=1)))
        s.execute(update(Interpretation).where(Interpretation.id == newest).values(text="an early password"))
    everything = texts(hits(server, keys["root"], q="password", limit=500))
    assert len(everything) == 6 and "an early password" in everything
    for size in (1, 2, 3):
        seen, cursor = [], None
        while True:
            page = hits(server, keys["root"], q="password", limit=size, **({"cursor": cursor} if cursor else {}))
            seen += texts(page)
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen)), (size, seen)


@pytest.mark.parametrize("q", [
    'NEAR(password secret)', "password AND OR", '"unterminated', "text:password", "password*", "-password",
    "pass^word", "(password", "password)", "'password'", "password OR", "{text}: password", "password\\",
    "a & b | !c", "password:*", "<->",
])
def test_query_syntax_of_either_database_is_plain_text(world, q):
    server, keys, _ = world
    with server.client(keys["root"]) as http:
        resp = http.get("/v1/search", params={"q": q})
    if any(ch.isalnum() for ch in q):
        assert resp.status_code == 200, resp.text
    else:
        assert resp.status_code == 400, resp.text


def test_operator_words_are_searched_as_words(world):
    server, keys, _ = world
    with session_scope(server.app.state.settings.database_url) as s:
        add_job(s, None, ["cats AND dogs or NEAR the house"])
    assert texts(hits(server, keys["root"], q="AND NEAR")) == ["cats AND dogs or NEAR the house"]
    assert texts(hits(server, keys["root"], q="password*")) == texts(hits(server, keys["root"], q="password"))


@pytest.mark.parametrize("params, status, says", [
    ({}, 422, "q"),
    ({"q": ""}, 422, "q"),
    ({"q": "x" * 201}, 422, "200"),
    ({"q": '"" * - ()'}, 400, "no words"),
    ({"q": "- * ^ :"}, 400, "no words"),
    ({"q": "password", "layer_min": "one"}, 422, "layer_min"),
    ({"q": "password", "layer_min": 3, "layer_max": 1}, 400, "layer_min"),
    ({"q": "password", "since": "yesterday"}, 422, "since"),
    ({"q": "password", "kind": "lenses"}, 422, "kind"),
    ({"q": "password", "grounded": "maybe"}, 422, "grounded"),
    ({"q": "password", "job": "not-a-job"}, 422, "job"),
    ({"q": "password", "limit": 0}, 422, "limit"),
    ({"q": "password", "cursor": "!!"}, 400, "cursor"),
    ({"q": "a b c d e f g h i j k l m n o p q"}, 400, "at most 16"),
])
def test_bad_search_input_is_a_clear_4xx(world, params, status, says):
    server, keys, _ = world
    with server.client(keys["root"]) as http:
        resp = http.get("/v1/search", params=params)
    assert resp.status_code == status, resp.text
    assert says in resp.text


def test_the_index_follows_updates_and_deletes_in_the_same_transaction(world):
    server, keys, jobs = world
    url = server.app.state.settings.database_url
    with session_scope(url) as s:
        s.execute(update(Interpretation).where(Interpretation.text == "no match here").values(text="now a crocodile"))
    assert texts(hits(server, keys["root"], q="crocodile")) == ["now a crocodile"]
    assert texts(hits(server, keys["root"], q="match")) == []
    with pytest.raises(RuntimeError), session_scope(url) as s:  # rolled back: neither row nor index entry stays
        add_job(s, None, ["an ocelot"])
        raise RuntimeError("abort")
    assert texts(hits(server, keys["root"], q="ocelot")) == []
    with session_scope(url) as s:  # the job's rows go by ON DELETE CASCADE, and their index entries with them
        s.execute(delete(Job).where(Job.id == jobs["bob"]))
    assert texts(hits(server, keys["root"], q="explosive")) == []
    assert texts(hits(server, keys["root"], q="tower")) == ["a tower in paris"]
    # bob's rows were the newest: SQLite gives their ids to the next rows, which must not match bob's words
    with session_scope(url) as s:
        add_job(s, None, ["a quiet meadow", "another quiet meadow"])
    assert texts(hits(server, keys["root"], q="explosive")) == []
    assert texts(hits(server, keys["root"], q="leaked")) == []
    assert len(texts(hits(server, keys["root"], q="quiet meadow"))) == 2


def test_the_migration_indexes_rows_stored_before_it(database_url):
    from selfie_jobs.migrate import upgrade
    from selfie_jobs.search import search
    from selfie_jobs.auth import LOCAL_PRINCIPAL

    upgrade(database_url, "0006_job_kinds")
    with session_scope(database_url) as s:
        # the tables as 0006 made them (no lens_readings yet): plain SQL, not the newest models
        s.execute(text("INSERT INTO jobs (id, model, kind, state, priority, spec, batch_key, total, done, created_at) "
                       "VALUES ('a' || :z, 'tiny', 'interpret', 'succeeded', 5, '{}', 'k', 1, 1, :t)"),
                  {"z": "0" * 31, "t": T0})
        s.execute(text("INSERT INTO chunks (job_id, \"index\", model, batch_key, priority, state, items, size, "
                       "attempts) VALUES ('a' || :z, 0, 'tiny', 'k', 5, 'done', '[]', 1, 0)"), {"z": "0" * 31})
        s.execute(text("INSERT INTO interpretations (job_id, prompt_index, layer, token, source_token, text, "
                       "token_ids, relevancy, mean_relevancy, chunk_id, engine_run_id, worker, model, created_at) "
                       "VALUES ('a' || :z, 0, 1, 1, 'x', 'an old heron', '[]', '[]', 0.1, 1, 'r', 'w', 'tiny', :t)"),
                  {"z": "0" * 31, "t": T0})
    upgrade(database_url)
    with session_scope(database_url) as s:
        found = search(s, LOCAL_PRINCIPAL, "heron").rows
    get_engine.cache_clear()
    assert [r["text"] for r in found] == ["an old heron"]
