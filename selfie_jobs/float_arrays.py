"""Per-token float lists stored compactly: float32 values in one column.

Relevancy lists (one float per generated token) are most of a result row's size when stored as JSON text: about
409 bytes for 20 tokens on PostgreSQL, against 80 as float32. Writers keep passing lists of floats and readers get
lists of floats; only the column holds float32s: on SQLite a little-endian float32 array in a BLOB, on PostgreSQL
a `real[]` (float4 array; 101 bytes for 20 values, the array's 21-byte header included). PostgreSQL's own array
type lets the server itself write a list as text, which a whole job's CSV export needs to run at the database's
speed rather than Python's (selfie_jobs.csv_copy); a BYTEA it cannot read as numbers.

Why float32 and not float16: relevancy is |P_inject - P_no_inject|, a difference of two probabilities the model
computes in float32 (bfloat16 and float16 models are upcast for the softmax), so float32 keeps every digit the
engine knows (relative error under 6e-8). float16 would keep about three: in [0.5, 1) its step is 4.9e-4, which
changes the fourth decimal the explorer and the CLI print and breaks the 1e-4 agreement with the engine run in
process that the tests check; and relevancies below 6e-5 (common: most generated tokens owe little to the
injected state) fall into float16's subnormals and lose their digits, below 6e-8 to zero. float16 would save 40
more bytes of a row of about 600.

A read returns the stored float32 values exactly, as Python floats (0.5 reads as 0.5; 0.1, which float32 cannot
hold, as 0.10000000149011612): the JSON the API writes is the same list of numbers, equal to the engine's values
within float32's precision. On PostgreSQL a `real[]` read as text would give float32's shortest digits ("0.1"),
which Python reads as another double, and parsing text is slow: the column is read as the array's binary form
(`array_send`: a header, then each value as 4 length bytes and 4 big-endian float32 bytes), decoded here at the
speed the BYTEA column was (benchmarks/README.md "Stored rows").
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import LargeBinary
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import REAL, TypeDecorator

_LITTLE_ENDIAN = sys.byteorder == "little"
FLOAT32_MAX = 3.4028234663852886e38


def float32_array(values: Sequence[float]) -> array:
    """`values` as float32s (each rounded to the nearest); ValueError for a value that is not finite in float32."""
    packed = array("f", values)  # raises TypeError for a non-number, OverflowError never: rounds to inf
    # One sum in C instead of a test per value: it is finite exactly when every value is (a NaN or an infinity
    # makes it NaN or infinite, and finite float32 values cannot add up past float64's range).
    if not math.isfinite(sum(packed)):
        bad = next(value for value in packed if not math.isfinite(value))
        raise ValueError(f"a stored float list holds only finite float32 values, not {bad!r} "
                         f"(|x| <= {FLOAT32_MAX:.7g})")
    return packed


def pack_floats(values: Sequence[float]) -> bytes:
    """Little-endian float32 bytes of `values`; ValueError for a value that is not finite in float32."""
    packed = float32_array(values)
    if not _LITTLE_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


#: array_send's header of a one-dimensional float4 array: ndim 1, no NULLs, element type 700 (float4); the
#: length and lower bound follow.
_FLOAT4_ARRAY_HEADER = (1).to_bytes(4, "big") + (0).to_bytes(4, "big") + (700).to_bytes(4, "big")
_EMPTY_ARRAY_HEADER = (0).to_bytes(4, "big") + (0).to_bytes(4, "big") + (700).to_bytes(4, "big")


def unpack_array_send(data: bytes | bytearray | memoryview) -> list[float]:
    """The floats of a float4 array in PostgreSQL's binary form (`array_send(real[])`)."""
    if data[:12] == _EMPTY_ARRAY_HEADER and len(data) == 12:
        return []
    if data[:12] != _FLOAT4_ARRAY_HEADER or len(data) < 20 or (len(data) - 20) % 8:
        raise ValueError("not the binary form of a one-dimensional float4 array without NULLs")
    return list(_array_values((len(data) - 20) // 8).unpack_from(data, 20))


@lru_cache(maxsize=256)
def _array_values(n: int) -> struct.Struct:
    """n values of a float4 array's binary form, each after its 4-byte length."""
    return struct.Struct(">" + "4xf" * n)


def unpack_floats(data: bytes | bytearray | memoryview) -> list[float]:
    """The floats of `pack_floats`' bytes."""
    if len(data) % 4:
        raise ValueError(f"a float32 array has a multiple of 4 bytes, not {len(data)}")
    values = array("f")
    values.frombytes(bytes(data))
    if not _LITTLE_ENDIAN:
        values.byteswap()
    return values.tolist()


_WORD = next(code for code in "IL" if array(code).itemsize == 4)  # a 4-byte unsigned array type
_LENGTH_WORD = array(_WORD, (4).to_bytes(4, "big"))


class Float4ArrayBinary:
    """A one-dimensional float4 array in PostgreSQL's binary form, ready to send as a `real[]` parameter (psycopg
    dumps it as it is once `register_float4_arrays` has run on the connection). psycopg's own dumper of a list of
    floats writes it value by value in Python: for the write path's one flat array of every row's relevancy (1,280
    values for 64 rows of 20) that was a tenth of a write's time (benchmarks/README.md "Database cycle")."""

    __slots__ = ("data",)

    def __init__(self, values: Sequence[float]) -> None:
        packed = float32_array(values)
        if not packed:
            self.data = _EMPTY_ARRAY_HEADER
            return
        if _LITTLE_ENDIAN:
            packed.byteswap()
        # each value after its length (4 bytes, big-endian 4), as 4-byte words of the machine's order
        words = array(_WORD, bytes(8 * len(packed)))
        words[0::2] = _LENGTH_WORD * len(packed)
        words[1::2] = array(_WORD, packed.tobytes())
        self.data = _FLOAT4_ARRAY_HEADER + struct.pack(">ii", len(packed), 1) + words.tobytes()


def register_float4_arrays(adapters: Any) -> None:
    """Let psycopg send `Float4ArrayBinary` values (on a connection's or a cursor's adapters map)."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class Float4ArrayDumper(Dumper):
        format = Format.BINARY
        oid = 1021  # float4[]

        def dump(self, obj: Float4ArrayBinary) -> bytes:
            return obj.data

    adapters.register_dumper(Float4ArrayBinary, Float4ArrayDumper)


class Float32List(TypeDecorator):
    """A list of floats as float32s: `real[]` on PostgreSQL, little-endian float32 bytes in a BLOB elsewhere."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(REAL))
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("Float32List takes a list of floats, not bytes")
        if dialect.name == "postgresql":
            return float32_array(value).tolist()
        return pack_floats(value)

    def process_result_value(self, value: Any, dialect: Any) -> list[float] | None:
        # A SELECT of the column reads it through column_expression (below); this is for what reads the column
        # itself, such as RETURNING.
        if value is None:
            return None
        return list(value) if dialect.name == "postgresql" else unpack_floats(value)

    def column_expression(self, column: Any) -> ColumnElement[Any]:
        return _ReadExactly(column)


class _Float32ListRead(TypeDecorator):
    """What `_ReadExactly` returns: bytes, decoded into the list of floats."""

    impl = LargeBinary
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> list[float] | None:
        if value is None:
            return None
        return unpack_array_send(value) if dialect.name == "postgresql" else unpack_floats(value)


class _ReadExactly(FunctionElement):
    """A Float32List column as a SELECT reads it: array_send(col) on PostgreSQL (the array's binary form), the
    column itself elsewhere; both are bytes."""

    inherit_cache = True
    type = _Float32ListRead()


@compiles(_ReadExactly)
def _read_exactly(element: _ReadExactly, compiler: Any, **kw: Any) -> str:
    return compiler.process(list(element.clauses)[0], **kw)


@compiles(_ReadExactly, "postgresql")
def _read_exactly_postgresql(element: _ReadExactly, compiler: Any, **kw: Any) -> str:
    return f"array_send({compiler.process(list(element.clauses)[0], **kw)})"


__all__ = ["FLOAT32_MAX", "Float32List", "Float4ArrayBinary", "float32_array", "pack_floats", "register_float4_arrays",
           "unpack_array_send", "unpack_floats"]
