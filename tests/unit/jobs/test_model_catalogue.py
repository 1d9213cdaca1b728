"""The model catalogue: `selfie models add` makes a local folder a named model (card from its config and tokenizer,
no weights loaded), the API validates jobs for it before any worker serves it, a worker given only the name loads
the folder in the recorded dtype and keeps the entry, and a hub id this machine cannot reach fails clearly."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfie_jobs import cards
from selfie_jobs.db import session_scope
from selfie_jobs.migrate import upgrade
from selfie_jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.unit.core.conftest import _llama, build_tokenizer

    tokenizer = build_tokenizer()
    path = tmp_path_factory.mktemp("tiny-llama")
    _llama(tokenizer).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def database(tmp_path):
    url = f"sqlite:///{tmp_path / 'selfie.db'}"
    upgrade(url)
    return url


def selfie(database_url, *args, **env):
    environ = {**os.environ, "SELFIE_DATABASE_URL": database_url, "SELFIE_DATA_DIR": str(Path(database_url[10:]).parent),
               "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "selfie_cli", *args], capture_output=True, text=True, timeout=300,
                          env=environ, cwd=ROOT)


def test_an_added_folder_is_listed_and_carded_without_a_worker(folder, database):
    done = selfie(database, "models", "add", "tiny-llama", "--path", str(folder), "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert "LlamaForCausalLM (LLaMA 2/3 (and SmolLM2)), 4 layers, hidden size 64, context 256" in done.stdout
    with session_scope(database) as s:
        card = cards.read_model_card(s, "tiny-llama")
        assert cards.catalogue_entry(s, "tiny-llama")["path"] == str(folder.resolve())
        listed = cards.served_models(s, 45.0)
    assert (card["num_layers"], card["hidden_size"], card["max_context"]) == (4, 64, 256)
    assert card["family"] == "LLaMA 2/3 (and SmolLM2)" and card["chat_template"].startswith("{% for message")
    assert card["catalogue"]["dtype"] == "float32" and "summarize" in card["presets"]
    assert [(m["name"], m["workers"]) for m in listed] == [("tiny-llama", [])]
    # the card validates the way a worker's does: the same tokenizer, the same layer count
    from tokenizers import Tokenizer

    from tests.unit.core.conftest import build_tokenizer

    text = "The Eiffel Tower is in Paris."
    assert Tokenizer.from_str(card["tokenizer_json"]).encode(text).ids == build_tokenizer()(text).input_ids
    listing = selfie(database, "models", "list")
    assert listing.stdout.split() == ["tiny-llama", "float32", str(folder.resolve())]
    assert selfie(database, "models", "remove", "tiny-llama").returncode == 0
    gone = selfie(database, "models", "remove", "tiny-llama")
    assert gone.returncode == 1 and gone.stderr.strip() == "error: 'tiny-llama' is not in the model catalogue"


def test_a_worker_serves_a_catalogued_model_by_name_in_its_dtype(folder, database, tmp_path):
    from selfie_core.cardinfo import folder_card
    from workers.runtime import WorkerOptions, start_runtime, stop_runtime

    with session_scope(database) as s:
        cards.add_to_catalogue(s, "tiny", folder_card(str(folder), "tiny", "bfloat16"), path=str(folder),
                               dtype="bfloat16")
    settings = Settings(data_dir=tmp_path, database_url=database, heartbeat_interval_seconds=60)
    runtime = start_runtime(settings, WorkerOptions(model="tiny", node_name="t@h"))
    try:
        assert runtime.source == str(folder) and runtime.dtype == "bfloat16"
        assert next(runtime.engine.model.parameters()).dtype == torch.bfloat16
        with session_scope(database) as s:
            card = cards.read_model_card(s, "tiny")
            assert card["catalogue"]["path"] == str(folder) and card["dtype"] == "bfloat16"
            assert card["source"] == str(folder) and card["num_layers"] == 4
            assert [w["info"]["dtype"] for w in cards.served_models(s, 45.0)[0]["workers"]] == ["bfloat16"]
    finally:
        stop_runtime()


@pytest.mark.parametrize("command", [["models", "add", "tiny", "--path", "FOLDER"], ["models", "list"],
                                     ["keys", "list"]])
def test_a_database_without_the_schema_says_to_migrate(folder, tmp_path, command):
    # a fresh data folder, as a new user has before `selfie up`: this was sqlite3's "no such table" traceback
    import sqlite3

    path = tmp_path / "fresh" / "selfie.db"
    fresh = f"sqlite:///{path}"
    (tmp_path / "fresh").mkdir()
    argv = [str(folder) if part == "FOLDER" else part for part in command]
    missing = selfie(fresh, *argv)  # no file at all: said, and none is created
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr
    assert missing.stderr.splitlines()[0] == f"error: there is no database at {path}" and not path.exists()
    sqlite3.connect(path).close()  # an empty file: the schema is missing
    done = selfie(fresh, *argv)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [f"error: the database {fresh} does not have the service's newest schema",
                                        "run `selfie migrate` first (`selfie up` migrates too), with the same "
                                        "SELFIE_DATABASE_URL or SELFIE_DATA_DIR"]
    upgrade(fresh)
    assert selfie(fresh, *argv).returncode == 0
    with sqlite3.connect(path) as conn:  # migrated by a newer selfie: said so, not "a fault of selfie"
        conn.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    newer = selfie(fresh, *argv)
    assert newer.returncode == 1 and "is at revision 0099_from_the_future, newer than this selfie" in newer.stderr


def test_a_worker_naming_gpus_it_does_not_see_refuses_before_loading(folder, database, tmp_path):
    from selfie_core.cardinfo import folder_card

    # CUDA_VISIBLE_DEVICES=-1 hides every GPU, on any machine; the worker used to load the model onto the disk and
    # then say it "does not fit in 75% of the free memory of its 2 GPU(s)"
    with session_scope(database) as s:
        cards.add_to_catalogue(s, "tiny", folder_card(str(folder), "tiny", "float32"), path=str(folder),
                               dtype="float32")
    code = ("from selfie_jobs.settings import Settings\n"
            "from workers.runtime import WorkerOptions, start_runtime\n"
            f"settings = Settings(data_dir={str(tmp_path)!r}, database_url={database!r})\n"
            "try:\n"
            "    start_runtime(settings, WorkerOptions(model='tiny', node_name='t@h', device='cuda:0', gpus=[0, 1]))\n"
            "except RuntimeError as exc:\n    print(exc)\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.stdout.startswith("--gpus 0,1 names 2 CUDA device(s) but this process sees 0 (CUDA_VISIBLE_DEVICES='-1')"), (
        out.stdout + out.stderr)
    assert "without a GPU, serve on the CPU" in out.stdout


@pytest.mark.parametrize("path, message", [
    ("/no/such/folder", "Invalid value for --path: no model folder at /no/such/folder"),
    ("org/some-model", "'org/some-model' is a Hugging Face hub id that is not in this machine's hub cache"),
])
def test_what_cannot_be_added_says_why_in_one_line(database, tmp_path, path, message):
    done = selfie(database, "models", "add", "m", "--path", path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert done.returncode in (1, 2) and message in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr
    if path.startswith("org/"):
        assert "HF_HUB_OFFLINE is set" in done.stderr and done.returncode == 1


@pytest.mark.parametrize("name, message", [
    ("", "a model name cannot be empty or blank"),
    ("   ", "a model name cannot be empty or blank"),
    (" tiny", "a model name cannot start or end with blanks: ' tiny'"),
    ("a\tb", "a model name is printable text; 'a\\tb' is not"),
    ("x" * 201, "a model name has at most 200 characters; this one has 201"),
])
def test_a_name_no_job_could_ask_for_is_refused_and_nothing_stored(folder, database, name, message):
    # the API takes 1..200 characters for a job's model; a longer name failed PostgreSQL's column with a traceback
    done = selfie(database, "models", "add", name, "--path", str(folder))
    assert done.returncode == 2 and f"Invalid value for NAME: {message}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    with session_scope(database) as s:
        assert cards.catalogued_models(s) == {}


def test_a_name_that_is_not_utf8_is_refused(folder, database):
    environ = {**os.environ, "SELFIE_DATABASE_URL": database, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "selfie_cli", "models", "add", b"x\xff", "--path", str(folder)],
                          capture_output=True, env=environ, cwd=ROOT, timeout=300)
    stderr = done.stderr.decode()
    assert done.returncode == 2 and "a model name is printable text" in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 7}, "its config.json is not valid: The hidden size (64) is not a multiple of the number "
                                 "of attention heads (7)."),
    ({"num_hidden_layers": "4"}, "its config.json is not valid: Field 'num_hidden_layers' expected int, got str"),
    ({"max_position_embeddings": -5}, "its config.json gives no context length"),
])
def test_a_config_that_does_not_hold_together_is_refused_in_one_line(folder, database, tmp_path, change, message):
    import json
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, **change}))
    done = selfie(database, "models", "add", "odd", "--path", str(odd))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: cannot read a model at {odd.resolve()}: {message}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with session_scope(database) as s:
        assert cards.read_model_card(s, "odd") is None


def test_an_unsupported_family_is_refused_at_add(database, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from tests.unit.core.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=32)).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    done = selfie(database, "models", "add", "opt", "--path", str(tmp_path / "opt"))
    assert done.returncode == 1 and "(model_type 'opt') is not supported. Supported families: LLaMA" in done.stderr
    with session_scope(database) as s:
        assert cards.read_model_card(s, "opt") is None


def test_a_hub_id_offline_fails_clearly_in_the_engine(tmp_path, monkeypatch):
    code = ("from selfie_core import load_model\n"
            "try:\n    load_model('org/some-model')\n"
            "except OSError as exc:\n    print(type(exc).__name__, exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ModelUnavailableError model 'org/some-model' is a Hugging Face hub id")
    assert "HF_HUB_OFFLINE is set, so the hub is not asked" in out and "selfie models add NAME --path DIR" in out
    assert "(hf download org/some-model" in out  # the command the installed huggingface_hub has (no huggingface-cli)


def test_removing_a_model_that_jobs_wait_for_is_refused_unless_they_are_failed(folder, database):
    """A removed model has no card and no folder a worker could load: jobs still waiting for it would wait for ever."""
    from selfie_core.cardinfo import folder_card
    from selfie_jobs.models import Chunk, Job
    from tests.unit.jobs.factories import make_job

    with session_scope(database) as s:
        cards.add_to_catalogue(s, "tiny", folder_card(str(folder), "tiny", "float32"), path=str(folder),
                               dtype="float32")
        waiting = make_job(s, model="tiny").id
        done = make_job(s, model="tiny")
        done.state = "succeeded"
    refused = selfie(database, "models", "remove", "tiny")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == ("error: 1 unfinished job(s) still wait for 'tiny'; removing it would strand "
                                      "them: wait for them, cancel them, or pass --fail-jobs to fail them")
    with session_scope(database) as s:
        assert cards.catalogue_entry(s, "tiny") is not None and s.get(Job, waiting).state == "queued"
    removed = selfie(database, "models", "remove", "tiny", "--fail-jobs")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == "removed tiny and failed its 1 unfinished job(s)"
    with session_scope(database) as s:
        job = s.get(Job, waiting)
        assert cards.catalogue_entry(s, "tiny") is None
        assert job.state == "failed" and job.error == cards.REMOVED_MODEL_ERROR
        assert {c.state for c in s.query(Chunk).filter_by(job_id=waiting)} == {"failed"}
        assert s.get(Job, done.id).state == "succeeded"


def test_interpret_loads_a_catalogued_model_from_its_folder(folder, database, tmp_path):
    # `selfie interpret --model tiny` took `tiny` for a hub id: offline it failed telling the user to run the
    # `selfie models add` they had run; online it retried the network for ~24 s
    assert selfie(database, "models", "add", "tiny", "--path", str(folder), "--dtype", "float32").returncode == 0
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = selfie(database, "interpret", "The Eiffel Tower", "--model", "tiny", "--layers", "1", "--tokens", "0",
                  "--max-new-tokens", "2", "--format", "csv", **offline)
    assert done.returncode == 0, done.stderr
    import io

    import pandas as pd

    table = pd.read_csv(io.StringIO(done.stdout))
    assert list(zip(table["layer"], table["token"])) == [(1, 0)] and table["prompt"][0] == "The Eiffel Tower"
    help_text = selfie(database, "interpret", "--help").stdout
    assert "Served model name" not in help_text and "selfie models add" in help_text
    # without a database (a fresh data folder) a name is a hub id as before, and no database file is made
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    hub = selfie(f"sqlite:///{fresh / 'selfie.db'}", "interpret", "x", "--model", "org/some-model", **offline)
    assert hub.returncode == 1 and "'org/some-model' is a Hugging Face hub id" in hub.stderr, hub.stderr
    assert not (fresh / "selfie.db").exists()


def test_load_source_is_the_catalogue_entry_unless_told_otherwise(folder, database):
    with session_scope(database) as s:
        card = {"architecture": "LlamaForCausalLM", "num_layers": 4, "hidden_size": 64, "max_context": 256,
                "tokenizer_json": "{}"}
        cards.add_to_catalogue(s, "tiny", card, path=str(folder), dtype="bfloat16")
        assert cards.load_source(s, "tiny") == (str(folder), "bfloat16")
        assert cards.load_source(s, "tiny", dtype="float16") == (str(folder), "float16")
        assert cards.load_source(s, "tiny", model_path="/elsewhere") == ("/elsewhere", "float32")
        assert cards.load_source(s, "org/name") == (None, "float32")


def test_re_adding_a_model_needs_replace_and_names_its_live_workers(folder, database):
    assert selfie(database, "models", "add", "tiny", "--path", str(folder), "--dtype", "float32").returncode == 0
    with session_scope(database) as s:  # a live worker (this process) serves it
        cards.heartbeat(s, cards.worker_identity("w@h", "tiny", "cpu"), state="ready")
    again = selfie(database, "models", "add", "tiny", "--path", str(folder), "--dtype", "bfloat16")
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    first, hint = again.stderr.strip().splitlines()
    assert first.startswith(f"error: 'tiny' is already in the model catalogue (float32, from {folder.resolve()}); "
                            "served now by w@h:")
    assert hint.startswith("pass --replace to replace it")
    with session_scope(database) as s:
        assert cards.catalogue_entry(s, "tiny")["dtype"] == "float32"  # the card of what the worker runs stays
    replaced = selfie(database, "models", "add", "tiny", "--path", str(folder), "--dtype", "bfloat16", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert "note: tiny is served now by w@h:" in replaced.stderr
    assert "the replacement takes effect when its workers restart" in replaced.stderr
    with session_scope(database) as s:
        assert cards.catalogue_entry(s, "tiny")["dtype"] == "bfloat16"
