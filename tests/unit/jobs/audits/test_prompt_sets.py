"""Prompt set parsing (JSONL/CSV, streamed) and storage with bounded memory; the built-in sets."""

from __future__ import annotations

import io
import json
import tracemalloc

import pytest
from sqlalchemy import func, select

from selfie_jobs.audit_models import PromptSetItem
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.migrate import upgrade
from selfie_jobs.prompt_sets import BUILTIN, PromptSetError, builtin_path, create_prompt_set, ensure_builtin, \
    iter_csv, iter_items, iter_jsonl


def test_jsonl_strings_objects_meta_and_blank_lines():
    data = b'"plain prompt"\n\n{"prompt": "with meta", "category": "x", "id": 7}\n{"text": "text key"}\n'
    rows = list(iter_jsonl(io.BytesIO(data)))
    assert [(r.text, r.meta) for r in rows] == [("plain prompt", {}), ("with meta", {"category": "x", "id": 7}),
                                                ("text key", {})]


@pytest.mark.parametrize("data, message", [
    (b'{"prompt": "ok"}\n{broken\n', "line 2: not valid JSON"),
    (b'{"prompt": 3}\n', "line 1: the prompt must be a string"),
    (b'{"other": "x"}\n', "line 1: an object needs a 'prompt'"),
    (b'[1, 2]\n', "line 1: expected a string or an object"),
    (b'"a\\u0000b"\n', "line 1: NUL"),
    (b'"' + b"x" * 50 + b'"\n', "line 1: the prompt has 50 characters; at most 10"),
    (b'\xff\xfe"x"\n', "not UTF-8"),
])
def test_jsonl_errors_name_the_line(data, message):
    with pytest.raises(PromptSetError, match=message):
        list(iter_jsonl(io.BytesIO(data), max_chars=10))


def test_csv_header_quoting_bom_and_meta():
    data = "\ufeffid,Prompt,topic\n1,\"multi\nline, with comma\",a\n2,second,\n,,\n".encode()
    rows = list(iter_csv(io.BytesIO(data)))
    assert [(r.text, r.meta) for r in rows] == [("multi\nline, with comma", {"id": "1", "topic": "a"}),
                                                ("second", {"id": "2"})]
    with pytest.raises(PromptSetError, match="'prompt' \\(or 'text'\\) column"):
        list(iter_csv(io.BytesIO(b"a,b\n1,2\n")))


def test_ten_thousand_prompts_are_stored_with_bounded_memory(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(10_000):
            fh.write(json.dumps({"prompt": f"prompt number {i} " + "word " * 40, "n": i}) + "\n")
    assert path.stat().st_size > 2_000_000
    maker = get_sessionmaker(url)
    with maker() as session, open(path, "rb") as fh:
        tracemalloc.start()
        ps = create_prompt_set(session, "big", fh, "jsonl")
        session.commit()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert ps.size == 10_000
        # the file is 2+ MB and its Python objects would be several times that: rows go to the database in batches
        assert peak < 6_000_000, peak
        assert session.scalar(select(func.count()).select_from(PromptSetItem)) == 10_000
        tracemalloc.start()
        seen = sum(1 for _ in iter_items(session, ps.id, start=9_000, batch=250))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seen == 1_000 and peak < 3_000_000


def test_builtin_sets_are_valid_and_benign(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    with get_sessionmaker(url)() as session:
        for name in BUILTIN:
            with open(builtin_path(name), "rb") as fh:
                rows = list(iter_jsonl(fh))
            assert 10 <= len(rows) <= 60 and all(r.meta.get("category") for r in rows)
            ps = ensure_builtin(session, name)
            assert ps.size == len(rows) and ensure_builtin(session, name).id == ps.id
        session.commit()
    with pytest.raises(PromptSetError, match="unknown built-in"):
        builtin_path("nope")
