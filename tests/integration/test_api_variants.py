"""Model variants over real HTTP (uvicorn), SQLite and PostgreSQL, real Redis: a job that names a variant carries
it in its spec and batch key; naming one that does not exist, another key's or one of another base model is a
clear 4xx with nothing stored or enqueued, for every engine kind. /v1/variants lists, shows and deletes a key's own
(another key's answers 404), and the client and the CLI do the same through it."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from selfie_client import Client, SelfieError
from selfie_jobs.auth import create_key
from selfie_jobs.db import session_scope
from selfie_jobs.models import Job, Variant, utcnow
from selfie_jobs.specs import spec_batch_key
from tests.apisupport import flush_model_queue, live_server, prepare_database, queued_messages, settings_for
from tests.unit.jobs.factories import make_variant

PROMPT = "the cat sat on the mat"


@pytest.fixture
def env(database_url, redis_url, tmp_path):
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=model)
    root = tmp_path / "variant-store"
    with session_scope(database_url) as s:
        alice, alice_secret = create_key(s, "alice")
        bob, bob_secret = create_key(s, "bob")
        _, admin_secret = create_key(s, "root", admin=True)
        now = utcnow()
        older = make_variant(s, root, b"alice 1", model=model, owner_key_id=alice.id, created_at=now - timedelta(1))
        newer = make_variant(s, root, b"alice 2", model=model, owner_key_id=alice.id, created_at=now)
        elsewhere = make_variant(s, root, b"alice 3", model="another-model", owner_key_id=alice.id,
                                 created_at=now - timedelta(2))
        bobs = make_variant(s, root, b"bob 1", model=model, owner_key_id=bob.id, created_at=now)
        ids = {"older": older.id, "newer": newer.id, "elsewhere": elsewhere.id, "bob": bobs.id}
        paths = {name: root / v.path for name, v in
                 (("older", older), ("newer", newer), ("elsewhere", elsewhere), ("bob", bobs))}
    settings = settings_for(database_url, redis_url, auth_enabled=True, variant_store_dir=root)
    with live_server(settings) as srv:
        yield {"url": database_url, "redis": redis_url, "model": model, "server": srv, "ids": ids, "paths": paths,
               "alice": alice_secret, "bob": bob_secret, "admin": admin_secret}
    flush_model_queue(redis_url, model)


def _count(url, entity) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(entity))


def _bodies(model: str, variant: str) -> list[tuple[str, dict]]:
    return [
        ("/v1/jobs", {"model": model, "prompts": [PROMPT], "targets": {"layers": [1], "tokens": [0]},
                      "variant": variant}),
        ("/v1/jobs/vectors", {"model": model, "vectors": [[0.5] * 16], "variant": variant}),
        ("/v1/jobs/lenses", {"model": model, "prompts": [PROMPT], "targets": {"layers": [1], "tokens": [0]},
                             "variant": variant}),
        ("/v1/jobs/generate", {"model": model, "prompts": [PROMPT], "chat": False, "variant": variant}),
    ]


def test_jobs_naming_a_variant_carry_it_in_spec_and_batch_key(env):
    ids = env["ids"]
    with env["server"].client(env["alice"]) as http:
        accepted = {}
        for path, body in _bodies(env["model"], ids["newer"]):
            resp = http.post(path, json=body)
            assert resp.status_code == 202, resp.text
            plain = http.post(path, json={k: v for k, v in body.items() if k != "variant"})
            other = http.post(path, json={**body, "variant": ids["older"]})
            accepted[path] = (resp.json()["id"], plain.json()["id"], other.json()["id"])
    with session_scope(env["url"]) as s:
        for path, (with_variant, plain, other) in accepted.items():
            job, base, second = s.get(Job, with_variant), s.get(Job, plain), s.get(Job, other)
            assert job.spec["variant"] == ids["newer"] and second.spec["variant"] == ids["older"], path
            assert "variant" not in base.spec, path
            assert {k: v for k, v in job.spec.items() if k != "variant"} == base.spec, path
            # batches never mix variants, nor a variant with the model's own weights
            assert len({job.batch_key, base.batch_key, second.batch_key}) == 3, path
            kind = {"kind": base.kind} if base.kind != "interpret" else {}
            assert base.batch_key == spec_batch_key({**kind, **base.spec}), path  # as before variants existed


@pytest.mark.parametrize("which, status, field, message", [
    ("unknown", 404, "variant", "no such variant"),
    ("bob", 404, "variant", "no such variant"),
    ("elsewhere", 422, "variant", "edits model 'another-model'"),
])
def test_a_variant_that_is_not_usable_is_refused_with_nothing_stored(env, which, status, field, message):
    variant = uuid.uuid4().hex if which == "unknown" else env["ids"][which]
    jobs_before = _count(env["url"], Job)
    with env["server"].client(env["alice"]) as http:
        for path, body in _bodies(env["model"], variant):
            resp = http.post(path, json=body)
            assert resp.status_code == status, (path, resp.text)
            assert resp.json()["field"] == field and message in resp.json()["detail"], (path, resp.text)
    assert _count(env["url"], Job) == jobs_before
    assert queued_messages(env["redis"], env["model"]) == []


def test_variant_routes_list_show_and_delete_a_keys_own(env):
    ids, paths, url = env["ids"], env["paths"], env["server"].url
    with env["server"].client(env["alice"]) as http:
        listed = http.get("/v1/variants").json()
        first = http.get("/v1/variants", params={"limit": 1}).json()
        second = http.get("/v1/variants", params={"limit": 1, "cursor": first["next_cursor"]}).json()
        shown = http.get(f"/v1/variants/{ids['newer']}").json()
        assert http.get(f"/v1/variants/{ids['bob']}").status_code == 404
        assert http.get("/v1/variants/not-a-variant").status_code == 404
        assert http.get("/v1/variants", params={"cursor": "garbage"}).status_code == 400
    assert [v["id"] for v in listed["variants"]] == [ids["newer"], ids["older"], ids["elsewhere"]]
    assert listed["next_cursor"] is None
    assert [v["id"] for v in first["variants"] + second["variants"]] == [ids["newer"], ids["older"]]
    assert shown["model"] == env["model"] and shown["layer"] == 1 and shown["method"] == "supervised"
    assert shown["sha256"] and shown["settings"] == {"epochs": 2, "lr": 3e-4} and shown["losses"][0]["epoch"] == 0
    assert shown["evaluations"] == {} and shown["job_link"].endswith(f"/v1/jobs/{shown['job_id']}")
    assert shown["created_at"].endswith(("Z", "+00:00")) and shown["page"] == f"{url}/ui/variants/{ids['newer']}"

    with env["server"].client(env["bob"]) as http:
        assert [v["id"] for v in http.get("/v1/variants").json()["variants"]] == [ids["bob"]]
        assert http.delete(f"/v1/variants/{ids['newer']}").status_code == 404
    assert paths["newer"].is_file()
    with env["server"].client(env["admin"]) as http:
        assert len(http.get("/v1/variants").json()["variants"]) == 4

    with Client(url, env["alice"]) as client:
        assert [v["id"] for v in client.variants()] == [ids["newer"], ids["older"], ids["elsewhere"]]
        assert client.variant(ids["older"])["sha256"] == shown_sha(env, "older")
        assert client.delete_variant(ids["newer"]) == {"id": ids["newer"], "deleted": True}
        with pytest.raises(SelfieError) as gone:
            client.variant(ids["newer"])
        assert gone.value.status == 404
        with pytest.raises(SelfieError) as refused:
            client.submit(PROMPT, model=env["model"], layers=[1], tokens=[0], variant=ids["newer"])
        assert refused.value.status == 404 and refused.value.field == "variant"
        accepted = client.submit(PROMPT, model=env["model"], layers=[1], tokens=[0], variant=ids["older"])
    assert not paths["newer"].exists() and not paths["newer"].parent.exists()
    with session_scope(env["url"]) as s:
        assert s.get(Variant, ids["newer"]) is None
        assert s.get(Job, accepted["id"]).spec["variant"] == ids["older"]


def shown_sha(env, name: str) -> str:
    from selfie_jobs.variants import file_sha256

    return file_sha256(env["paths"][name])


def test_cli_lists_shows_and_deletes_variants(env):
    from selfie_cli.main import cli

    ids, args = env["ids"], ["--url", env["server"].url, "--api-key", env["alice"]]
    runner = CliRunner()
    listed = runner.invoke(cli, ["variants", *args], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert ids["newer"] in listed.output and ids["bob"] not in listed.output and "supervised" in listed.output
    shown = runner.invoke(cli, ["variants", "show", ids["older"], *args])
    assert shown.exit_code == 0, shown.output
    assert f"variant {ids['older']}: supervised edit of {env['model']}, layer 1" in shown.output
    assert "sha256:" in shown.output and "1 epochs" in shown.output
    other = runner.invoke(cli, ["variants", "show", ids["bob"], *args])
    assert other.exit_code == 1 and "404" in other.output and "no such variant" in other.output
    deleted = runner.invoke(cli, ["variants", "delete", ids["older"], *args])
    assert deleted.exit_code == 0 and f"variant {ids['older']} deleted" in deleted.output
    assert not env["paths"]["older"].exists()
    submitted = runner.invoke(cli, ["submit", PROMPT, "--model", env["model"], "--layers", "1", "--tokens", "0",
                                    "--lens", "logit", "--variant", ids["newer"], *args])
    assert submitted.exit_code == 0, submitted.output
    with session_scope(env["url"]) as s:
        job = s.scalars(select(Job).where(Job.kind == "lenses")).one()
        assert job.spec == {"lenses": ["logit"], "top_k": 5, "variant": ids["newer"]}


def test_generate_names_a_variant_from_the_client_and_the_cli(env):
    """`Client.submit_generate(variant=...)` and `selfie generate --variant` carry the variant into the job; the CLI
    refuses sampling options without --sample instead of decoding greedily in silence."""
    from selfie_cli.main import cli

    ids, args = env["ids"], ["--url", env["server"].url, "--api-key", env["alice"]]
    with Client(env["server"].url, env["alice"]) as client:
        accepted = client.submit_generate(PROMPT, model=env["model"], chat=False, variant=ids["older"])
        with pytest.raises(SelfieError) as refused:
            client.submit_generate(PROMPT, model=env["model"], chat=False, variant=ids["bob"])
        assert refused.value.status == 404 and refused.value.field == "variant"
    runner = CliRunner()
    submitted = runner.invoke(cli, ["generate", PROMPT, "--model", env["model"], "--raw", "--variant", ids["newer"],
                                    "--no-wait", *args])
    assert submitted.exit_code == 0, submitted.output
    ignored = runner.invoke(cli, ["generate", PROMPT, "--model", env["model"], "--raw", "--seed", "7", "--no-wait",
                                  *args])
    assert ignored.exit_code == 2 and "--seed only apply with --sample" in ignored.output, ignored.output
    with session_scope(env["url"]) as s:
        variants = sorted(j.spec["variant"] for j in s.scalars(select(Job).where(Job.kind == "generate")))
    assert variants == sorted([ids["older"], ids["newer"]])


def test_concurrent_deletes_of_one_variant_answer_deleted_once(env):
    """Six DELETEs of one variant at once (real HTTP, the server's threads): the row goes by a conditional DELETE,
    so exactly one answers 200 deleted and the others 404, and the files are gone."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    ids, paths = env["ids"], env["paths"]
    barrier = Barrier(6)

    def delete_once(_):
        with env["server"].client(env["alice"]) as http:
            barrier.wait()
            return http.delete(f"/v1/variants/{ids['older']}")

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(delete_once, range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 404, 404, 404, 404, 404], [(r.status_code, r.text[:200]) for r in answers]
    assert [r.json() for r in answers if r.status_code == 200] == [{"id": ids["older"], "deleted": True}]
    assert not paths["older"].exists() and paths["newer"].is_file()
    with session_scope(env["url"]) as s:
        assert s.get(Variant, ids["older"]) is None and s.get(Variant, ids["newer"]) is not None
