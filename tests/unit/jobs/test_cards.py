"""Model cards and worker heartbeats: what the API reads to validate requests and list served models."""

from __future__ import annotations

from datetime import timedelta

import pytest

from selfie_jobs import cards
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.models import Worker, utcnow

CARD = {"name": "tiny-llama", "architecture": "LlamaForCausalLM", "num_layers": 2, "hidden_size": 32,
        "max_context": 128, "tokenizer_json": "{}", "presets": {"summarize": ["[INST]", 0, "[/INST]"]}}


@pytest.fixture
def db(migrated_database_url):
    return get_sessionmaker(migrated_database_url)


def test_card_roundtrip_and_replace(db):
    with db() as s, s.begin():
        cards.write_model_card(s, "tiny", CARD)
    with db() as s, s.begin():
        cards.write_model_card(s, "tiny", {**CARD, "num_layers": 3})
    with db() as s:
        card = cards.read_model_card(s, "tiny")
        assert card["num_layers"] == 3 and card["presets"]["summarize"][1] == 0 and card["tokenizer_json"] == "{}"
        assert cards.read_model_card(s, "nope") is None
    with pytest.raises(ValueError, match="lacks"), db() as s:
        cards.write_model_card(s, "bad", {"name": "bad"})


def test_heartbeats_decide_which_models_are_served(db):
    now = utcnow()
    with db() as s, s.begin():
        cards.write_model_card(s, "tiny", CARD)
        cards.heartbeat(s, cards.WorkerIdentity("a:1", "tiny", "h", 1, "cuda:0"), info={"batches": 3}, now=now)
        cards.heartbeat(s, cards.WorkerIdentity("b:2", "gone", "h", 2, "cpu"), now=now - timedelta(seconds=100))
    with db() as s:
        served = cards.served_models(s, 45, now=now)
    assert [m["name"] for m in served] == ["tiny"]
    assert served[0]["workers"][0]["info"] == {"batches": 3} and "tokenizer_json" not in served[0]
    with db() as s, s.begin():
        cards.mark_worker(s, "a:1", "stopped")
    with db() as s:
        assert cards.served_models(s, 45) == []


def test_dead_local_processes_are_marked(db):
    import socket

    with db() as s, s.begin():
        cards.heartbeat(s, cards.WorkerIdentity("x:999999", "tiny", socket.gethostname(), 999_999, "cpu"))
        me = cards.worker_identity("node", "tiny", "cpu")
        cards.heartbeat(s, me)
    with db() as s, s.begin():
        assert cards.mark_dead_local_workers(s) == ["x:999999"]
        assert s.get(Worker, me.name).state == "ready"
