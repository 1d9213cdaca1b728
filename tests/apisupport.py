"""Helpers for api tests: a tiny model card (a real `tokenizers` tokenizer), a live uvicorn server, Redis queues."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from tests import services

WORDS = (
    "the eiffel tower is located in paris , capital of france . a cat sat on mat dog ran to park "
    "what meaning sure i will summarize message"
).split()
MODEL = "tiny"
NUM_LAYERS = 4
MAX_CONTEXT = 48


def tiny_tokenizer_json() -> str:
    """A word-level tokenizer that adds a BOS token, as a `tokenizer.json` text (what a worker stores)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "<s>": 1, "_": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["<s>"])
    return tok.to_str()


def tiny_card(**overrides: Any) -> dict[str, Any]:
    card = {
        "name": MODEL,
        "architecture": "LlamaForCausalLM",
        "num_layers": NUM_LAYERS,
        "hidden_size": 16,
        "max_context": MAX_CONTEXT,
        "presets": ["summarize", "describe"],
        "tokenizer_json": tiny_tokenizer_json(),
    }
    card.update(overrides)
    return card


def prepare_database(url: str, *, model: str = MODEL, card: dict[str, Any] | None = None) -> None:
    """Newest schema (by the migrations) and the tiny model card (written as a worker writes it)."""
    from selfie_jobs.cards import write_model_card
    from selfie_jobs.db import session_scope
    from selfie_jobs.migrate import upgrade

    upgrade(url)
    with session_scope(url) as session:
        write_model_card(session, model, card or tiny_card(name=model))


def settings_for(database_url: str, redis_url: str, **overrides: Any):
    from selfie_jobs.settings import Settings

    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "auth_enabled": False,
        "chunk_size": 8,
        "max_interpretations_per_job": 500,
        "max_new_tokens_cap": 32,
        "max_prompts_per_job": 20,
        "max_prompt_chars": 400,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@dataclass
class LiveServer:
    url: str
    app: Any

    def client(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@contextmanager
def live_server(settings, **app_kwargs: Any) -> Iterator[LiveServer]:
    """uvicorn serving `create_app(settings)` on a free loopback port, in a thread, for real HTTP."""
    import uvicorn

    from api.main import create_app

    app = create_app(settings, **app_kwargs)
    port = services.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def queued_messages(redis_url: str, model: str = MODEL) -> list[dict[str, Any]]:
    """Every Celery message waiting in the model's queue lists (one list per priority), decoded from JSON."""
    import redis

    from selfie_jobs.queue import model_queue

    client = redis.Redis.from_url(redis_url)
    name = model_queue(model)
    out = []
    for key in sorted(client.keys(name + "*")):
        key_s = key.decode()
        # Celery's Redis transport keeps one list per priority step: the queue name, then a separator and the step.
        if key_s != name and key_s[len(name)] not in (":", "\x06"):
            continue  # another model whose name merely starts with this one
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            out.append(json.loads(raw))
    return out


def message_chunk_ids(messages: list[dict[str, Any]]) -> list[int]:
    """The chunk ids the run_chunk messages carry (Celery protocol 2: body = base64 JSON [args, kwargs, embed])."""
    import base64

    from selfie_jobs.queue import RUN_CHUNK_TASK

    ids = []
    for message in messages:
        assert message["content-type"] == "application/json", message["content-type"]
        assert message["headers"]["task"] == RUN_CHUNK_TASK
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = json.loads(body)
        ids.extend(args)
    return sorted(ids)


def flush_model_queue(redis_url: str, model: str = MODEL) -> None:
    import redis

    from selfie_jobs.queue import model_queue

    client = redis.Redis.from_url(redis_url)
    for key in client.keys(model_queue(model) + "*"):
        client.delete(key)
