"""The Alembic revisions produce exactly the schema the SQLAlchemy models declare, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from selfie_jobs import migrate
from selfie_jobs.db import create_db_engine
from selfie_jobs.models import Base
from selfie_jobs.search import is_search_object


def _made_on(obj, dialect: str) -> bool:
    """Whether the models make `obj` on `dialect`: an index declared for one dialect only (`ddl_if`, as the text
    filter's trigram index on PostgreSQL) is not made on the others, which autogenerate does not know."""
    condition = getattr(obj, "_ddl_if", None)
    return condition is None or condition.dialect in (None, dialect)


def test_upgrade_head_matches_models(database_url):
    migrate.upgrade(database_url)
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "compare_type": True, "render_as_batch": True,
                # the full-text objects are SQL of their own (tests/integration/test_search.py checks them)
                "include_object": lambda obj, name, *_: not is_search_object(name)
                and _made_on(obj, conn.dialect.name)})
            diff = compare_metadata(ctx, Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == [], f"migrations differ from the models: {diff}"
    assert set(Base.metadata.tables) <= tables
    assert migrate.check(database_url)


def test_upgrade_is_idempotent_and_downgrade_works(database_url):
    migrate.upgrade(database_url)
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision()
    migrate.downgrade(database_url, "base")
    assert migrate.current_revision(database_url) is None
    assert not migrate.check(database_url)


def test_uploads_named_like_a_built_in_are_renamed(database_url):
    from sqlalchemy import text

    migrate.upgrade(database_url, "0003_job_request_hash")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO prompt_sets (id, name, description, source, size, created_at) VALUES "
                              "(7, 'prompt_injections', '', 'upload', 0, CURRENT_TIMESTAMP), "
                              "(8, 'mine', '', 'upload', 0, CURRENT_TIMESTAMP)"))
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            names = dict(conn.execute(text("SELECT id, name FROM prompt_sets ORDER BY id")).all())
    finally:
        engine.dispose()
    assert names == {7: "prompt_injections (upload 7)", 8: "mine"}


def test_names_unique_per_key_keeps_every_row(database_url):
    """0005 on a database at 0004 with data in it: every row kept, and two keys may now use the same name."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    migrate.upgrade(database_url, "0004_uploads_named_like_builtins")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO api_keys (id, name, prefix, key_hash, is_admin, created_at) VALUES "
                              "(1, 'a', 'sk-selfie-aaaaaa', 'h1', false, CURRENT_TIMESTAMP), "
                              "(2, 'b', 'sk-selfie-bbbbbb', 'h2', false, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO prompt_sets (id, name, description, source, size, owner_key_id, created_at) "
                              "VALUES (1, 'mine', '', 'upload', 1, 1, CURRENT_TIMESTAMP), "
                              "(2, 'ethical_decisions', '', 'builtin', 0, NULL, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO prompt_set_items (id, prompt_set_id, \"index\", text, meta) VALUES "
                              "(1, 1, 0, 'a prompt', '{}')"))
            conn.execute(text("INSERT INTO audits (id, name, model, prompt_set_id, targets, options, detectors, "
                              "enabled, owner_key_id, created_at, updated_at) VALUES (1, 'nightly', 'm', 1, '{}', "
                              "'{}', '[]', true, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        migrate.upgrade(database_url)
        with engine.begin() as conn:
            sets = conn.execute(text("SELECT id, name, owner_key_id FROM prompt_sets ORDER BY id")).all()
            items = conn.execute(text("SELECT prompt_set_id, text FROM prompt_set_items")).all()
            audits = conn.execute(text("SELECT id, name, prompt_set_id, owner_key_id FROM audits")).all()
            # key 2 takes the names key 1 uses
            conn.execute(text("INSERT INTO prompt_sets (id, name, description, source, size, owner_key_id, "
                              "created_at) VALUES (3, 'mine', '', 'upload', 0, 2, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO audits (id, name, model, prompt_set_id, targets, options, detectors, "
                              "enabled, owner_key_id, created_at, updated_at) VALUES (2, 'nightly', 'm', 3, '{}', "
                              "'{}', '[]', true, 2, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        refused = []
        for owner in ("1", "NULL"):  # one key (or the keyless owner of built-ins) still cannot use a name twice
            name = "mine" if owner == "1" else "ethical_decisions"
            try:
                with engine.begin() as conn:
                    conn.execute(text("INSERT INTO prompt_sets (id, name, description, source, size, owner_key_id, "
                                      f"created_at) VALUES (9, '{name}', '', 'upload', 0, {owner}, CURRENT_TIMESTAMP)"))
            except IntegrityError:
                refused.append(owner)
    finally:
        engine.dispose()
    assert [tuple(r) for r in sets] == [(1, "mine", 1), (2, "ethical_decisions", None)]
    assert [tuple(r) for r in items] == [(1, "a prompt")]
    assert [tuple(r) for r in audits] == [(1, "nightly", 1, 1)]
    assert refused == ["1", "NULL"]


def test_job_kinds_upgrade_keeps_every_row_and_makes_them_interpret(database_url):
    """0006 adds jobs.kind to a database with jobs in it: every row is kept and every job is an interpretation."""
    from sqlalchemy import text

    migrate.upgrade(database_url, "0005_names_unique_per_key")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            for n in range(3):
                conn.execute(text(
                    "INSERT INTO jobs (id, model, state, priority, spec, batch_key, total, done, created_at) VALUES "
                    f"('{n:032x}', 'm', 'succeeded', 5, '{{}}', 'k', 1, 1, CURRENT_TIMESTAMP)"))
                conn.execute(text("INSERT INTO prompts (id, job_id, \"index\", text, tokens) VALUES "
                                  f"({n + 1}, '{n:032x}', 0, 'p{n}', '[\"p\"]')"))
                conn.execute(text("INSERT INTO chunks (id, job_id, \"index\", model, batch_key, priority, state, items, "
                                  f"size, attempts) VALUES ({n + 1}, '{n:032x}', 0, 'm', 'k', 5, 'done', '[[0, 1, 0]]', "
                                  "1, 1)"))
                conn.execute(text(
                    "INSERT INTO interpretations (id, job_id, prompt_index, layer, token, source_token, text, "
                    "token_ids, relevancy, mean_relevancy, chunk_id, engine_run_id, worker, model, created_at) VALUES "
                    f"({n + 1}, '{n:032x}', 0, 1, 0, 'p', 'text {n}', '[1]', '[0.5]', 0.5, {n + 1}, 'r', 'w', 'm', "
                    "CURRENT_TIMESTAMP)"))
        before = _counts(engine)
        migrate.upgrade(database_url)
        after = _counts(engine)
        with engine.connect() as conn:
            kinds = conn.execute(text("SELECT id, kind FROM jobs ORDER BY id")).all()
            texts = [t for (t,) in conn.execute(text("SELECT text FROM interpretations ORDER BY id"))]
    finally:
        engine.dispose()
    assert before == after == {"jobs": 3, "prompts": 3, "chunks": 3, "interpretations": 3}
    assert kinds == [(f"{n:032x}", "interpret") for n in range(3)]
    assert texts == ["text 0", "text 1", "text 2"]


def test_grounding_upgrade_keeps_every_row_unjudged(database_url):
    """0011 adds jobs.baseline and interpretations.grounded/ungrounded_reason to a database with results in it:
    every row is kept, and the rows stored before are not judged (NULL), rather than called grounded."""
    from sqlalchemy import text

    migrate.upgrade(database_url, "0006_job_kinds")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            for n in range(3):
                conn.execute(text(
                    "INSERT INTO jobs (id, kind, model, state, priority, spec, batch_key, total, done, created_at) "
                    f"VALUES ('{n:032x}', 'interpret', 'm', 'succeeded', 5, '{{\"template\": {{\"preset\": "
                    "\"summarize\"}}', 'k', 1, 1, CURRENT_TIMESTAMP)"))
                conn.execute(text("INSERT INTO prompts (id, job_id, \"index\", text, tokens) VALUES "
                                  f"({n + 1}, '{n:032x}', 0, 'p{n}', '[\"p\"]')"))
                conn.execute(text("INSERT INTO chunks (id, job_id, \"index\", model, batch_key, priority, state, items, "
                                  f"size, attempts) VALUES ({n + 1}, '{n:032x}', 0, 'm', 'k', 5, 'done', '[[0, 1, 0]]', "
                                  "1, 1)"))
                conn.execute(text(
                    "INSERT INTO interpretations (id, job_id, prompt_index, layer, token, source_token, text, "
                    "token_ids, relevancy, mean_relevancy, chunk_id, engine_run_id, worker, model, created_at) VALUES "
                    f"({n + 1}, '{n:032x}', 0, 1, 0, 'p', 'text {n}', '[1]', '[0.5]', 0.5, {n + 1}, 'r', 'w', 'm', "
                    "CURRENT_TIMESTAMP)"))
        before = _counts(engine)
        migrate.upgrade(database_url, "0011_grounding")
        assert migrate.current_revision(database_url) == "0011_grounding"
        after = _counts(engine)
        with engine.connect() as conn:
            jobs = conn.execute(text("SELECT id, baseline, spec FROM jobs ORDER BY id")).all()
            rows = conn.execute(text("SELECT text, grounded, ungrounded_reason FROM interpretations ORDER BY id")).all()
            if engine.dialect.name == "sqlite":  # the table was altered, not copied: search's triggers are still there
                triggers = set(conn.execute(text(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'interpretations'")).scalars())
                assert {"interpretations_fts_insert", "interpretations_fts_delete"} <= triggers, triggers
        migrate.downgrade(database_url, "0008_result_indexes")
        assert _counts(engine) == before
    finally:
        engine.dispose()
    assert before == after == {"jobs": 3, "prompts": 3, "chunks": 3, "interpretations": 3}
    assert [(j[0], j[1]) for j in jobs] == [(f"{n:032x}", None) for n in range(3)]
    assert all("summarize" in str(j[2]) for j in jobs)  # the spec, as stored: it renders as it was submitted
    assert [tuple(r) for r in rows] == [(f"text {n}", None, None) for n in range(3)]


def _counts(engine) -> dict[str, int]:
    from sqlalchemy import text

    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                for t in ("jobs", "prompts", "chunks", "interpretations")}


def test_a_fresh_sqlite_database_migrates_without_warnings(tmp_path):
    """`selfie up` on a new data folder runs every migration: none of them may print a warning to a new user."""
    import warnings

    from selfie_jobs.migrate import upgrade

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upgrade(f"sqlite:///{tmp_path / 'fresh.db'}")


def test_compact_rows_converts_every_relevancy_list_and_back(database_url):
    """0007 on a database at 0006 with results in it: every relevancy list (more than one conversion batch of
    them) becomes little-endian float32 bytes that read back as the same floats, every other column is kept, and
    the downgrade turns them back into the same JSON lists."""
    import json
    import struct

    from sqlalchemy import select, text
    from sqlalchemy.orm import Session

    from selfie_jobs.models import Interpretation, VectorInterpretation

    migrate.upgrade(database_url, "0006_job_kinds")
    n_rows = 5_003  # past one batch of the migration (5,000)
    lists = [[(i % 97) / 128, 1 / (i + 3), 0.0, 1e-7 * i][: 1 + i % 4] for i in range(n_rows)] + [[]]
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            for job in ("a" * 32, "b" * 32):
                conn.execute(text(
                    "INSERT INTO jobs (id, model, kind, state, priority, spec, batch_key, total, done, created_at) "
                    f"VALUES ('{job}', 'm', 'interpret', 'succeeded', 5, '{{}}', 'k', 1, 1, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO chunks (id, job_id, \"index\", model, batch_key, priority, state, items, "
                              f"size, attempts) VALUES (1, '{'a' * 32}', 0, 'm', 'k', 5, 'done', '[]', 1, 1), "
                              f"(2, '{'b' * 32}', 0, 'm', 'k', 5, 'done', '[]', 1, 1)"))
            conn.execute(text(
                "INSERT INTO interpretations (id, job_id, prompt_index, layer, token, source_token, text, token_ids, "
                "relevancy, mean_relevancy, chunk_id, engine_run_id, worker, model, created_at) VALUES (:id, :job, 0, "
                ":id, 0, 'p', :text, '[1]', :rel, 0.5, 1, 'r', 'w', 'm', CURRENT_TIMESTAMP)"),
                [{"id": i + 1, "job": "a" * 32, "text": f"text {i}", "rel": json.dumps(rel)}
                 for i, rel in enumerate(lists)])
            conn.execute(text(
                "INSERT INTO vector_interpretations (id, job_id, vector_index, label, norm, text, token_ids, relevancy, "
                "mean_relevancy, chunk_id, engine_run_id, worker, model, created_at) VALUES (1, :job, 0, 'v', 2.0, "
                "'says', '[1, 2]', '[0.25, 0.75]', 0.5, 2, 'r', 'w', 'm', CURRENT_TIMESTAMP)"), {"job": "b" * 32})
        before = _counts(engine)
        migrate.upgrade(database_url, "0014_text_filter_index")  # the bytes, before 0015 makes them real[]
        with engine.connect() as conn:
            raw = dict(conn.execute(text("SELECT id, relevancy FROM interpretations")).all())
        migrate.upgrade(database_url)
        after = _counts(engine)
        with engine.connect() as conn:
            texts = dict(conn.execute(text("SELECT id, text FROM interpretations")).all())
        with Session(engine) as session:
            read = dict(session.execute(select(Interpretation.id, Interpretation.relevancy)).all())
            vector = session.scalars(select(VectorInterpretation)).one()
            vector_read = (vector.relevancy, vector.token_ids, vector.label, vector.norm)
        migrate.downgrade(database_url, "0006_job_kinds")
        with engine.connect() as conn:
            back = {i: json.loads(r) if isinstance(r, str) else r
                    for i, r in conn.execute(text("SELECT id, relevancy FROM interpretations")).all()}
            vector_back = conn.execute(text("SELECT relevancy FROM vector_interpretations")).scalar_one()
    finally:
        engine.dispose()
    assert before == after
    assert after["interpretations"] == n_rows + 1
    f32 = [[struct.unpack("<f", struct.pack("<f", v))[0] for v in rel] for rel in lists]
    assert {i: bytes(b) for i, b in raw.items()} == {i + 1: struct.pack(f"<{len(rel)}f", *rel)
                                                     for i, rel in enumerate(lists)}
    assert read == {i + 1: rel for i, rel in enumerate(f32)}
    assert texts == {i + 1: f"text {i}" for i in range(n_rows)} | {n_rows + 1: f"text {n_rows}"}
    assert vector_read == ([0.25, 0.75], [1, 2], "v", 2.0)
    assert back == {i + 1: rel for i, rel in enumerate(f32)}
    assert (json.loads(vector_back) if isinstance(vector_back, str) else vector_back) == [0.25, 0.75]


def test_result_indexes_upgrade_keeps_every_row_and_builds_the_indexes(database_url):
    """0008 on a database with results in it: every row kept, the sort indexes built, the engine-run ones gone;
    and back down to the revision before it."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import LargeBinary, insert, literal, text
    from sqlalchemy.orm import Session

    from selfie_jobs.float_arrays import pack_floats
    from selfie_jobs.models import Interpretation
    from tests.unit.jobs.factories import make_job

    previous = ScriptDirectory.from_config(migrate.alembic_config()).get_revision("0008_result_indexes").down_revision
    migrate.upgrade(database_url, previous)
    engine = create_db_engine(database_url)
    try:
        with Session(engine) as s:
            job = make_job(s, items=[(0, layer, 0) for layer in range(3)])
            chunk_id = s.execute(text("SELECT min(id) FROM chunks")).scalar()
            for layer in range(3):  # the columns of this revision only (later ones add more: 0009's grounded)
                s.execute(insert(Interpretation.__table__).values(
                    job_id=job.id, prompt_index=0, layer=layer, token=0, source_token="t", text=f"text {layer}",
                    token_ids=[1], relevancy=literal(pack_floats([0.5, 0.25]), LargeBinary()),  # bytes until 0015
                    mean_relevancy=0.375, chunk_id=chunk_id, engine_run_id="r",
                    worker="w", model="tiny"))
            s.commit()
        before = _indexes(engine)
        migrate.upgrade(database_url, "0008_result_indexes")
        after = _indexes(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT layer, text FROM interpretations ORDER BY layer")).all()
        migrate.downgrade(database_url, previous)
        assert _indexes(engine) == before
    finally:
        engine.dispose()
    assert rows == [(0, "text 0"), (1, "text 1"), (2, "text 2")]
    dropped = before.keys() - after.keys()
    assert {"ix_interpretations_engine_run_id", "ix_vector_interpretations_engine_run_id"} <= dropped
    assert after["ix_interpretations_job_layer"] == ["job_id", "layer", "prompt_index", "token"]
    assert after["ix_interpretations_job_token"] == ["job_id", "prompt_index", "token", "layer"]
    assert after["ix_interpretations_job_relevancy"] == ["job_id", "mean_relevancy", "id"]
    assert after["ix_interpretations_job_created"] == ["job_id", "created_at", "id"]
    assert before["ix_interpretations_job_relevancy"] == ["job_id", "mean_relevancy"]


def _indexes(engine) -> dict[str, list[str]]:
    with engine.connect() as conn:
        found = inspect(conn)
        return {ix["name"]: ix["column_names"] for table in ("interpretations", "vector_interpretations")
                for ix in found.get_indexes(table)}


def test_text_filter_index_upgrade_builds_the_jobs_trigram_index_on_postgres_only(database_url):
    """0014 on a database with results in it: on PostgreSQL a GIN index of (job_id, text gin_trgm_ops) that the
    text filter's ILIKE can use, with the extensions it needs; nothing on SQLite. Back down: the index is gone, the
    extensions stay (other objects may use them)."""
    from sqlalchemy import text

    migrate.upgrade(database_url, "0013_generations")
    engine = create_db_engine(database_url)
    try:
        before = _indexes(engine)
        migrate.upgrade(database_url, "0014_text_filter_index")
        after = _indexes(engine)
        definition, extensions = None, set()
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                definition = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                                          {"n": "ix_interpretations_job_text_trgm"}).scalar()
        migrate.downgrade(database_url, "0013_generations")
        assert _indexes(engine) == before
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                extensions = set(conn.execute(text("SELECT extname FROM pg_extension")).scalars())
    finally:
        engine.dispose()
    if engine.dialect.name == "postgresql":
        assert after.keys() - before.keys() == {"ix_interpretations_job_text_trgm"}
        assert definition.endswith("USING gin (job_id, text gin_trgm_ops)"), definition
        assert {"pg_trgm", "btree_gin"} <= extensions
    else:
        assert after == before


def test_relevancy_arrays_upgrade_keeps_every_float32_bit_and_back(database_url):
    """0015 on a database at 0014 with float32 bytes stored: on PostgreSQL each list becomes a real[] of the same
    float32 values, bit for bit (signs, -0.0, subnormals, the largest float32, empty lists), read through the model
    as the same floats; the downgrade gives back the same bytes. SQLite keeps its bytes as they are."""
    import struct

    from sqlalchemy import select, text
    from sqlalchemy.orm import Session

    from selfie_jobs.float_arrays import pack_floats
    from selfie_jobs.models import Interpretation, VectorInterpretation

    migrate.upgrade(database_url, "0014_text_filter_index")
    edge = [0.0, -0.0, 1.0, -2.5, 0.1, 1e-45, -1.17549435e-38, 3.4028234663852886e38, -3.4028234663852886e38, 1e-7]
    lists = [edge, [], [0.5], *[[(i % 97) / 128, 1 / (i + 3), -1e-40 * i] for i in range(200)]]
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, model, kind, state, priority, spec, batch_key, total, done, created_at) "
                f"VALUES ('{'a' * 32}', 'm', 'interpret', 'succeeded', 5, '{{}}', 'k', 1, 1, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO chunks (id, job_id, \"index\", model, batch_key, priority, state, items, "
                              f"size, attempts) VALUES (1, '{'a' * 32}', 0, 'm', 'k', 5, 'done', '[]', 1, 1)"))
            conn.execute(text(
                "INSERT INTO interpretations (id, job_id, prompt_index, layer, token, source_token, text, token_ids, "
                "relevancy, mean_relevancy, chunk_id, engine_run_id, worker, model, created_at) VALUES (:id, :job, 0, "
                ":id, 0, 'p', 't', '[1]', :rel, 0.5, 1, 'r', 'w', 'm', CURRENT_TIMESTAMP)"),
                [{"id": i + 1, "job": "a" * 32, "rel": pack_floats(rel)} for i, rel in enumerate(lists)])
            conn.execute(text(
                "INSERT INTO vector_interpretations (id, job_id, vector_index, label, norm, text, token_ids, relevancy, "
                "mean_relevancy, chunk_id, engine_run_id, worker, model, created_at) VALUES (1, :job, 0, 'v', 2.0, "
                "'says', '[1, 2]', :rel, 0.5, 1, 'r', 'w', 'm', CURRENT_TIMESTAMP)"),
                {"job": "a" * 32, "rel": pack_floats([0.25, -0.75])})
        migrate.upgrade(database_url, "0015_relevancy_arrays")
        column_type = next(c["type"] for c in inspect(engine).get_columns("interpretations")
                           if c["name"] == "relevancy").compile(dialect=engine.dialect)
        with Session(engine) as session:
            read = dict(session.execute(select(Interpretation.id, Interpretation.relevancy)).all())
            vector_read = session.scalars(select(VectorInterpretation.relevancy)).one()
        migrate.downgrade(database_url, "0014_text_filter_index")
        with engine.connect() as conn:
            back = {i: bytes(b) for i, b in conn.execute(text("SELECT id, relevancy FROM interpretations")).all()}
            vector_back = bytes(conn.execute(text("SELECT relevancy FROM vector_interpretations")).scalar_one())
    finally:
        engine.dispose()
    f32 = [list(struct.unpack(f"<{len(rel)}f", pack_floats(rel))) for rel in lists]
    assert column_type == ("REAL[]" if engine.dialect.name == "postgresql" else "BLOB")
    # bit for bit: the signs of zeros included (== would take -0.0 for 0.0)
    assert {i: [struct.pack("<f", v) for v in rel] for i, rel in read.items()} == \
        {i + 1: [struct.pack("<f", v) for v in rel] for i, rel in enumerate(f32)}
    assert vector_read == [0.25, -0.75]
    assert back == {i + 1: pack_floats(rel) for i, rel in enumerate(lists)}
    assert vector_back == pack_floats([0.25, -0.75])


@pytest.mark.postgres
def test_text_filter_index_upgrade_fails_clearly_without_the_right_to_create_its_extensions(postgres_url):
    """A role that may create tables but not extensions (no CREATE on the database): 0014 fails, naming the
    extension and what to run, instead of leaving the filter without its index."""
    import uuid

    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    role = "selfie_t_role_" + uuid.uuid4().hex[:8]
    admin = create_db_engine(postgres_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            conn.execute(text(f'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"'))
        url = make_url(postgres_url).set(username=role).render_as_string(hide_password=False)
        migrate.upgrade(url, "0013_generations")
        reason = r"(?s)needs the PostgreSQL extension pg_trgm.*CREATE EXTENSION pg_trgm;"
        with pytest.raises(RuntimeError, match=reason):
            migrate.upgrade(url)
        assert migrate.current_revision(url) == "0013_generations"
    finally:
        from selfie_jobs.db import get_engine

        get_engine.cache_clear()
        with admin.begin() as conn:  # the role's tables go with the test's database; its grant goes now
            conn.execute(text(f'DROP OWNED BY "{role}" CASCADE'))
            conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()
