"""The security list of docs/architecture.md and the reliability spec, checked against the code: JSON-only Celery
(producer, workers, Flower), Flower only behind basic auth, CORS closed unless configured, SQL only with bound
parameters, and no default secrets in docker-compose."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect

from selfie_cli.flower import FlowerConfigError, flower_command
from selfie_jobs.db import get_engine
from tests import services
from tests.apisupport import live_server, prepare_database, settings_for

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "selfie_jobs", "workers", "selfie_cli", "selfie_client", "migrations", "selfie_core")


# --- JSON-only Celery -----------------------------------------------------------------------------------------------


def test_every_celery_app_speaks_json_only(tmp_path):
    from api.broker import make_producer
    from selfie_jobs.settings import Settings
    from workers.celery_app import create_celery_app

    settings = Settings(_env_file=None, data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    for app in (make_producer("redis://127.0.0.1:1/0"), create_celery_app(settings, register=False)):
        conf = app.conf
        assert conf.task_serializer == "json" and conf.result_serializer == "json", app.main
        assert list(conf.accept_content) == ["json"], app.main
        assert conf.event_serializer == "json", app.main
    # Flower runs with the workers' app, not Celery's default one
    argv, env = flower_command("ops", "a-long-password", host="127.0.0.1", port=5555)
    assert argv[argv.index("-A") + 1] == "workers.celery_app"
    # the credentials travel in Flower's environment, never on its command line (readable by anyone with `ps`)
    assert env == {"FLOWER_BASIC_AUTH": "ops:a-long-password"} and not any("a-long-password" in a for a in argv)


# --- Flower ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "password"), [(None, None), ("ops", None), (None, "a-long-password"),
                                                ("ops", "short"), ("o:ps", "a-long-password")])
def test_flower_never_runs_without_usable_credentials(user, password):
    with pytest.raises(FlowerConfigError):
        flower_command(user, password, host="127.0.0.1", port=5555)


def test_selfie_flower_refuses_to_start_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_")}
    env["SELFIE_DATA_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "selfie_cli", "flower"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "SELFIE_FLOWER_USER and SELFIE_FLOWER_PASSWORD" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_selfie_flower_answers_only_with_basic_auth(tmp_path, redis_url):
    port = services.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_")}
    env.update(SELFIE_DATA_DIR=str(tmp_path), SELFIE_REDIS_URL=redis_url, SELFIE_FLOWER_USER="ops",
               SELFIE_FLOWER_PASSWORD="correct-horse-battery", PYTHONPATH=str(ROOT),
               SELFIE_DATABASE_URL=f"sqlite:///{tmp_path / 'f.db'}")
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "selfie_cli", "flower", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "flower.log").read_text()
            try:
                anonymous = httpx.get(url, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "flower did not start: " + (tmp_path / "flower.log").read_text()
                time.sleep(0.5)
        assert anonymous.status_code == 401
        assert httpx.get(url, auth=("ops", "wrong-password"), timeout=5).status_code == 401
        assert httpx.get(url, auth=("ops", "correct-horse-battery"), timeout=10).status_code == 200
        # Flower's Prometheus page names workers and tasks: behind the same auth
        assert httpx.get(url + "metrics", timeout=5).status_code == 401
        assert httpx.get(url + "metrics", auth=("ops", "wrong-password"), timeout=5).status_code == 401
        metrics = httpx.get(url + "metrics", auth=("ops", "correct-horse-battery"), timeout=10)
        assert metrics.status_code == 200 and "flower_" in metrics.text
        # the password is not on the command line of the process serving Flower (what `ps` shows every user)
        import psutil

        serving = psutil.Process(proc.pid)
        cmdline = " ".join(serving.cmdline())
        assert "flower" in cmdline and "correct-horse-battery" not in cmdline, cmdline
        assert all("correct-horse-battery" not in " ".join(p.cmdline()) for p in serving.children(recursive=True))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# --- CORS -----------------------------------------------------------------------------------------------------------


def _preflight(http: httpx.Client, origin: str) -> httpx.Response:
    return http.options("/v1/jobs", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})


def test_cors_allows_only_the_configured_origins(sqlite_url, redis_url):
    prepare_database(sqlite_url)
    settings = settings_for(sqlite_url, redis_url, cors_origins=["https://explorer.example"])
    with live_server(settings) as srv, srv.client() as http:
        allowed = _preflight(http, "https://explorer.example")
        refused = _preflight(http, "https://evil.example")
        simple = http.get("/healthz", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://explorer.example"
    assert "access-control-allow-credentials" not in allowed.headers
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in simple.headers


def test_cors_is_closed_without_configuration(sqlite_url, redis_url, monkeypatch):
    from selfie_jobs.settings import Settings

    monkeypatch.delenv("SELFIE_CORS_ORIGINS", raising=False)
    assert Settings(_env_file=None).cors_origins == []
    prepare_database(sqlite_url)
    with live_server(settings_for(sqlite_url, redis_url)) as srv, srv.client() as http:
        for origin in ("https://evil.example", "null", srv.url):
            assert "access-control-allow-origin" not in _preflight(http, origin).headers


# --- /metrics ------------------------------------------------------------------------------------------------------


def test_metrics_ask_for_the_bearer_token_when_one_is_set(sqlite_url, redis_url):
    prepare_database(sqlite_url)
    with live_server(settings_for(sqlite_url, redis_url, metrics_token="scrape-secret-1")) as srv, \
            srv.client() as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Basic scrape-secret-1"}).status_code == 401
        ok = http.get("/metrics", headers={"Authorization": "Bearer scrape-secret-1"})
    assert ok.status_code == 200 and "selfie_jobs" in ok.text
    with live_server(settings_for(sqlite_url, redis_url)) as srv, srv.client() as http:
        assert http.get("/metrics").status_code == 200  # without a token: open, as Prometheus endpoints usually are


# --- SQL --------------------------------------------------------------------------------------------------------------

_SQL_CALLS = {"text", "exec_driver_sql", "literal_column", "column", "table"}


def _dynamic_sql_calls(path: Path) -> list[str]:
    """Calls of text()/exec_driver_sql()/literal_column() (and friends) whose SQL is not a plain string literal."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name not in _SQL_CALLS:
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            continue
        if name in ("column", "table") and not isinstance(arg, (ast.JoinedStr, ast.BinOp)):
            continue  # sqlalchemy column()/table() take names; only built strings are suspicious there
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        hits.append(f"{where}:{node.lineno}: {name}({ast.unparse(arg)[:60]})")
    return hits


#: Calls whose SQL is not a literal but is SQLAlchemy's own compilation of a Core statement, with every value a
#: bound parameter (checked below): the write path runs its compiled insert through the driver (one execution of
#: an INSERT .. SELECT from unnest on PostgreSQL, an executemany on SQLite).
#: The write path's small statements (the job's lock, the chunk's marking, the job's progress) likewise run compiled
#: Core statements through the driver (`writes._DriverStatement`).
_COMPILED_SQL = {"selfie_jobs/bulk.py": {"exec_driver_sql(self.sql)"},
                 "selfie_jobs/writes.py": {"exec_driver_sql(self.sql)"}}


def test_sql_is_built_only_with_bound_parameters():
    hits = [hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
            for hit in _dynamic_sql_calls(path)
            if hit.split(": ", 1)[1] not in _COMPILED_SQL.get(hit.split(":", 1)[0], ())]
    assert not hits, "SQL text built from values (use bound parameters):\n" + "\n".join(hits)


def test_the_write_paths_compiled_insert_binds_every_value(sqlite_url):
    """The one allowed non-literal SQL: each result table's compiled insert has a placeholder per column and no
    value of its own (a quote or a digit of data would mean something was inlined). On PostgreSQL (compiled only:
    no server needed) every column is one parameter, the job's id read from the chunk's row as the write path asks."""
    import re

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from selfie_jobs.bulk import bulk_insert
    from selfie_jobs.db import create_db_engine
    from selfie_jobs.kinds import all_kinds
    from selfie_jobs.models import Chunk

    shared = ("job_id", "chunk_id", "engine_run_id", "worker", "model", "created_at")
    engines = [create_db_engine(sqlite_url), create_engine("postgresql+psycopg://")]
    try:
        for engine in engines:
            postgres = engine.dialect.name == "postgresql"
            with Session(engine) as session:
                for kind in all_kinds().values():
                    table = kind.table.__table__
                    # every column but a key the database makes (an edit's variant id is made by the worker)
                    columns = tuple(c.name for c in table.columns if not (c.primary_key and c.default is None))
                    plain = bulk_insert(session, table, columns, ("job_id",))  # compiled only, never run
                    # as the write path asks: the job's id read from the chunk's row
                    compiled = bulk_insert(session, table, columns, ("job_id",), shared, Chunk.__table__)
                    sql = compiled.sql
                    assert set(compiled.columns) == set(columns) - {"job_id"}, compiled.columns
                    assert "chunks.job_id" in sql and "FROM chunks" in sql, sql
                    if postgres:
                        names = re.findall(r"%\((\w+)\)[sb]", sql)
                        slices = {c + end for c in compiled.flattened for end in ("__first", "__last")}
                        assert set(names) == set(compiled.columns) | slices, sql
                        assert "WHERE chunks.id = %(chunk_id)s" in sql, sql
                        assert "%s" not in sql.replace("%(", ""), sql
                    else:
                        assert plain.sql.count("?") == len(columns), plain.sql
                        assert sql.count("?") == len(compiled.columns) and "WHERE chunks.id = ?" in sql, sql
                    assert "'" not in sql and '"' not in sql.replace('"index"', ""), sql
                    assert not re.search(r"(?<![\w(])\d", re.sub(r"VARCHAR\(\d+\)", "", sql)), sql
    finally:
        for engine in engines:
            engine.dispose()


def test_the_write_paths_small_statements_bind_every_value(sqlite_url):
    """The lock, the marking and the progress statements run through the driver bind every value: no quote or digit
    of data in their SQL, on SQLite and on PostgreSQL (compiled only)."""
    import re

    from sqlalchemy import create_engine

    from selfie_jobs.db import create_db_engine
    from selfie_jobs.kinds import all_kinds
    from selfie_jobs.writes import _driver_statement, _progress, _statements

    for engine in (create_db_engine(sqlite_url), create_engine("postgresql+psycopg://")):
        try:
            postgres = engine.dialect.name == "postgresql"

            class Conn:  # what _driver_statement reads of a connection (PostgreSQL's is never opened here)
                dialect = engine.dialect

            statements = {name: _statements(postgres)[name] for name in ("lock", "share", "mark_done")}
            statements |= {"progress:" + kind: _progress(kind, postgres) for kind in all_kinds()}
            for name, stmt in statements.items():
                sql = _driver_statement(Conn, name, stmt).sql
                assert "'" not in sql, sql
                assert not re.search(r"(?<![\w(])\d", re.sub(r"VARCHAR\(\d+\)", "", sql)), sql
        finally:
            engine.dispose()


def test_the_scan_sees_formatted_sql(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from sqlalchemy import text\nname = 'x'\nq = text(f\"select * from jobs where id = '{name}'\")\n"
                   "r = conn.exec_driver_sql('select %s' % name)\nok = text('select 1 where id = :id')\n")
    assert [h.split(": ", 1)[1].split("(")[0] for h in _dynamic_sql_calls(bad)] == ["text", "exec_driver_sql"]


def test_hostile_filter_values_are_data_not_sql(sqlite_url, redis_url):
    prepare_database(sqlite_url)
    hostile = ["'; DROP TABLE jobs; --", "%", "_", "\\", "' OR '1'='1", "x\" OR 1=1 --"]
    with live_server(settings_for(sqlite_url, redis_url)) as srv, srv.client() as http:
        job = http.post("/v1/jobs", json={"model": "tiny", "prompts": ["a cat sat"], "targets": {"pairs": [[1, -1]]}})
        assert job.status_code == 202, job.text
        for value in hostile:
            page = http.get(f"/v1/jobs/{job.json()['id']}/interpretations", params={"q": value})
            assert page.status_code == 200 and page.json()["items"] == [], (value, page.text)
            listing = http.get("/v1/jobs", params={"model": value})
            assert listing.status_code == 200 and listing.json()["jobs"] == [], value
        assert [j["id"] for j in http.get("/v1/jobs").json()["jobs"]] == [job.json()["id"]]
    engine = get_engine(sqlite_url)
    assert "jobs" in inspect(engine).get_table_names()


# --- docker-compose -------------------------------------------------------------------------------------------------


def test_docker_compose_has_no_default_secrets():
    text = (ROOT / "docker-compose.yml").read_text()
    secrets = re.findall(r"\$\{([A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|KEY)[A-Z0-9_]*)([^}]*)\}", text)
    assert secrets, "expected the compose file to take its secrets from the environment"
    for name, rest in secrets:
        assert rest.startswith(":?"), f"${{{name}{rest}}} must be required (${{{name}:?...}}), not defaulted"
    # and no literal password values
    assert not re.search(r"(?i)(password|secret)\s*[:=]\s*[\"']?(?!\$\{)[A-Za-z0-9]", text)
    # Flower runs through the command that insists on basic auth
    assert "selfie\", \"flower\"" in text
