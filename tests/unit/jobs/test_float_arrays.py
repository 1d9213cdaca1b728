"""Relevancy lists stored as float32s: written as lists of floats through the worker's write path, stored as 4 bytes
a value (little-endian bytes on SQLite, a `real[]` on PostgreSQL), read back as the same floats (float32's)."""

from __future__ import annotations

import json
import struct

import pytest
from sqlalchemy import select, text

from selfie_jobs import chunks as C
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.float_arrays import Float4ArrayBinary, pack_floats, unpack_array_send, unpack_floats
from selfie_jobs.kinds.vectors import VectorRow
from selfie_jobs.models import Interpretation, VectorInterpretation
from tests.unit.jobs.factories import make_job

#: The stored column's float32 values as little-endian bytes, read by the database itself: the BLOB as it is, the
#: PostgreSQL array element by element (float4send is big-endian: each word's bytes reversed), and 'not real[]'
#: when the column is of another type.
_FLOAT32_BYTES = {
    "sqlite": "relevancy",
    "postgresql": "CASE WHEN pg_typeof(relevancy) = 'real[]'::regtype THEN (SELECT coalesce(string_agg("
                  "substring(b from 4 for 1) || substring(b from 3 for 1) || substring(b from 2 for 1) || "
                  "substring(b from 1 for 1), ''::bytea ORDER BY o), ''::bytea) FROM (SELECT float4send(v) AS b, o "
                  "FROM unnest(relevancy) WITH ORDINALITY AS e(v, o)) AS w) ELSE 'not real[]'::bytea END",
}
ENGINE_VALUES = [0.0, 1.0, 0.123456789, 3.2e-9, 0.7399048272087007, 1e-45]


def _f32(values):
    return [struct.unpack("<f", struct.pack("<f", v))[0] for v in values]


def test_bytes_are_little_endian_float32_and_read_back_as_float32_values():
    assert pack_floats([1.0, -2.5]) == b"\x00\x00\x80\x3f\x00\x00\x20\xc0"
    assert pack_floats([]) == b""
    assert unpack_floats(pack_floats(ENGINE_VALUES)) == _f32(ENGINE_VALUES)
    assert unpack_floats(memoryview(pack_floats([0.5]))) == [0.5]


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [1e39]])
def test_values_float32_cannot_hold_are_refused(bad):
    with pytest.raises(ValueError, match="finite float32"):
        pack_floats(bad)


def test_postgres_binary_arrays_read_back_as_their_float32_values():
    header = struct.pack(">iii", 1, 0, 700)
    values = _f32(ENGINE_VALUES)
    sent = header + struct.pack(">ii", len(values), 1) + b"".join(struct.pack(">if", 4, v) for v in values)
    assert unpack_array_send(sent) == values
    assert unpack_array_send(struct.pack(">iii", 0, 0, 700)) == []
    for bad in (sent[:-1], struct.pack(">iii", 1, 1, 700) + sent[12:], struct.pack(">iii", 1, 0, 701) + sent[12:],
                struct.pack(">iii", 2, 0, 700) + sent[12:], b""):
        with pytest.raises(ValueError, match="one-dimensional float4"):
            unpack_array_send(bad)


def test_float4_arrays_for_postgres_hold_the_float32_values_in_its_binary_form():
    assert unpack_array_send(Float4ArrayBinary(ENGINE_VALUES).data) == _f32(ENGINE_VALUES)
    assert Float4ArrayBinary([]).data == struct.pack(">iii", 0, 0, 700)
    assert Float4ArrayBinary([1.0]).data == struct.pack(">iiiiiif", 1, 0, 700, 1, 1, 4, 1.0)
    with pytest.raises(ValueError, match="finite float32"):
        Float4ArrayBinary([0.5, float("nan")])


@pytest.mark.postgres
def test_float4_arrays_read_by_postgres_as_sent(postgres_url):
    """The server takes the binary form as a real[] and gives the same bits back."""
    import psycopg

    from selfie_jobs.float_arrays import register_float4_arrays

    with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql")) as conn:
        register_float4_arrays(conn.adapters)
        sent = conn.execute("SELECT array_send(%b::real[]), cardinality(%b::real[])",
                            (Float4ArrayBinary(ENGINE_VALUES), Float4ArrayBinary([]))).fetchone()
    assert unpack_array_send(sent[0]) == _f32(ENGINE_VALUES) and sent[1] == 0


def test_a_truncated_array_is_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        unpack_floats(b"\x00\x00\x80")


@pytest.fixture
def db(migrated_database_url):
    return get_sessionmaker(migrated_database_url)


def test_rows_written_as_lists_are_stored_as_float32_and_read_as_lists(db):
    with db() as s, s.begin():
        job = make_job(s, items=[(0, 0, 0), (0, 1, 0)], chunk_size=2)
        chunk = C.claim_chunk(s, _first_chunk(s, job.id), "w", 60)
    rows = [C.ResultRow(0, 0, 0, "t", "a", [1] * len(ENGINE_VALUES), ENGINE_VALUES, 0.3),
            C.ResultRow(0, 1, 0, "t", "b", [], [], 0.0)]
    assert C.complete_chunk(db, chunk.id, "w", rows, engine_run_id="r", worker="w", model="tiny").chunk_done
    with db() as s:
        stored = dict(s.execute(text(f"SELECT layer, {_FLOAT32_BYTES[s.get_bind().dialect.name]} "
                                     "FROM interpretations")).all())
        read = dict(s.execute(select(Interpretation.layer, Interpretation.relevancy)).all())
        page = s.scalars(select(Interpretation).order_by(Interpretation.layer)).all()
        # what the API's JSON carries: the list of numbers, as pydantic serialises the ORM row
        from api.schemas import InterpretationOut

        as_json = json.loads(InterpretationOut.model_validate(page[0]).model_dump_json())["relevancy"]
    assert {k: bytes(v) for k, v in stored.items()} == {0: struct.pack("<6f", *ENGINE_VALUES), 1: b""}
    assert read == {0: _f32(ENGINE_VALUES), 1: []}
    assert as_json == _f32(ENGINE_VALUES)
    assert max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(as_json, ENGINE_VALUES) if b > 1e-38) < 6e-8


def test_vector_rows_are_stored_as_float32_too(db):
    from selfie_jobs.models import Chunk

    with db() as s, s.begin():
        job = make_job(s, items=[(0,), (1,)], chunk_size=2)
        job.kind = "vectors"
        chunk_id = s.scalar(select(Chunk.id).where(Chunk.job_id == job.id))
    with db() as s, s.begin():
        C.claim_chunk(s, chunk_id, "w", 60)
    rows = [VectorRow(0, "v", 2.0, "says", [5, 6], [0.25, 0.125], 0.1875)]
    C.complete_chunk(db, chunk_id, "w", rows, engine_run_id="r", worker="w", model="tiny", complete=False)
    with db() as s:
        stored = s.execute(text(f"SELECT {_FLOAT32_BYTES[s.get_bind().dialect.name]} "
                                "FROM vector_interpretations")).scalar_one()
        read = s.scalars(select(VectorInterpretation.relevancy)).one()
    assert bytes(stored) == struct.pack("<2f", 0.25, 0.125) and read == [0.25, 0.125]


def _first_chunk(session, job_id):
    from selfie_jobs.models import Chunk

    return session.scalar(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.index))
