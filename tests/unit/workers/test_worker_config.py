"""The workers' Celery configuration and launch plumbing (no broker, no model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from selfie_jobs.queue import CONTROL_QUEUE, RECONCILE_TASK, RUN_CHUNK_TASK, model_queue
from selfie_jobs.settings import Settings
from workers import launch
from workers.celery_app import create_celery_app, visibility_timeout
from workers.gpus import pin_gpus
from workers.runtime import EngineRunner, WorkerOptions


def test_celery_settings_are_the_reliable_ones(tmp_path):
    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0", chunk_soft_time_limit_seconds=900)
    app = create_celery_app(settings, models=["tiny"])
    conf = app.conf
    assert conf.task_serializer == conf.result_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result and conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.broker_connection_retry_on_startup and conf.worker_proc_alive_timeout >= 600
    vt = conf.broker_transport_options["visibility_timeout"]
    assert vt == visibility_timeout(settings) and vt > 900 + 60
    assert conf.broker_transport_options["priority_steps"] == list(range(10))
    queues = {q.name: q for q in conf.task_queues}
    assert set(queues) == {CONTROL_QUEUE, model_queue("tiny")}
    assert all(q.exchange.name == q.name and q.routing_key == q.name for q in queues.values())
    assert conf.task_annotations[RUN_CHUNK_TASK]["soft_time_limit"] == 900
    assert conf.beat_schedule["reconcile"]["task"] == RECONCILE_TASK
    assert {RUN_CHUNK_TASK, RECONCILE_TASK} <= set(app.tasks)


def test_importing_the_worker_modules_loads_no_torch_and_builds_no_app():
    code = ("import sys, workers.celery_app, workers.tasks, workers.launch, workers.batcher, workers.embedded; "
            "print(sys.modules.get('torch') is None, workers.celery_app._LAZY_APP is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["True", "True"]


def test_worker_options_travel_through_the_environment():
    opts = WorkerOptions(model="tiny", model_path="/m", device="cuda:0", dtype="bfloat16", node_name="n@h",
                         batch_size=8, gpu=1, cuda_graphs=False, decode_attention="triton",
                         rms_norm="triton")
    assert WorkerOptions.from_env(opts.to_env()) == opts
    assert json.loads(opts.to_env()["SELFIE_WORKER_GPU"]) == 1


def test_gpu_pinning_and_worker_command_line(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    pin_gpus((3,))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    argv = launch.worker_argv("tiny", "selfie-tiny-gpu3@h", 1, "INFO", ["--max-tasks-per-child", "0"])
    assert argv[:3] == ["worker", "--pool", "prefork"]
    assert argv[argv.index("--queues") + 1] == f"{model_queue('tiny')},{CONTROL_QUEUE}"
    assert argv[argv.index("--concurrency") + 1] == "1" and argv[-2:] == ["--max-tasks-per-child", "0"]
    assert launch.default_node_name("org/model", 3).startswith("selfie-org_model-gpu3@")


def test_embedded_redis_stops_for_real_and_keeps_its_data(tmp_path):
    import psutil
    import redis

    from workers.embedded import start_embedded_redis

    server = start_embedded_redis(tmp_path)
    pid = server._server.pid
    try:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v" and server.ping()
    finally:
        server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=1).ping()
    # the snapshot taken on the way out brings the data back (queued messages survive a restart of the stack)
    with start_embedded_redis(tmp_path) as again:
        assert redis.Redis.from_url(again.url).get("k") == b"v"


def test_engine_settings_cache_keeps_only_the_most_recently_used_specs():
    def spec(seed):  # custom template parts: no tokenizer (no model) is needed to build the settings
        return {"template": {"parts": ["[INST]", 0, "[/INST]"]}, "injection": {"k": 1},
                "generation": {"max_new_tokens": 2, "do_sample": True, "seed": seed}}

    runner = EngineRunner(engine=None)
    first = runner.configs(spec(0))
    for seed in range(1, EngineRunner.MAX_CONFIGS + 40):
        runner.configs(spec(seed))
        assert runner.configs(spec(0)) is first  # in use all along: never evicted, never rebuilt
    assert len(runner._configs) == EngineRunner.MAX_CONFIGS
    assert runner.configs(spec(1))[2].seed == 1  # evicted long ago: built again, correctly
    assert len(runner._configs) == EngineRunner.MAX_CONFIGS


def test_both_worker_commands_refuse_a_batch_size_below_one(capsys):
    """The engine refuses it per job, which would fail every job as the client's bad input: refused at start."""
    from click.testing import CliRunner

    from selfie_cli.main import cli
    from workers.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["worker", "--model", "m", "--batch-size", "0"])
    assert exited.value.code == 2 and "--batch-size: must be at least 1, not 0" in capsys.readouterr().err
    result = CliRunner().invoke(cli, ["worker", "--model", "m", "--batch-size", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output


def test_beat_purges_expired_jobs_through_the_control_queue(tmp_path, migrated_database_url):
    """The purge is on beat's schedule for the control queue, and the task registered on this app deletes an
    expired job of this app's database (another app made before, with other settings, does not lend it its task)."""
    from datetime import timedelta

    from sqlalchemy import select

    from selfie_jobs.db import session_scope
    from selfie_jobs.models import Job, utcnow
    from selfie_jobs.queue import PURGE_TASK
    from tests.unit.jobs.factories import make_job

    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0", database_url=migrated_database_url,
                        purge_interval_seconds=600, job_ttl_seconds=3600)
    app = create_celery_app(settings, models=["tiny"])
    entry = app.conf.beat_schedule["purge"]
    assert entry["task"] == PURGE_TASK and entry["schedule"] == 600
    assert entry["options"]["queue"] == CONTROL_QUEUE and app.conf.task_routes[PURGE_TASK] == {"queue": CONTROL_QUEUE}
    with session_scope(migrated_database_url) as s:
        old, fresh = (make_job(s, created_at=utcnow() - timedelta(days=3)) for _ in range(2))
        old.state, old.finished_at = "succeeded", utcnow() - timedelta(hours=2)
        fresh.state, fresh.finished_at = "succeeded", utcnow() - timedelta(minutes=30)
        old_id, fresh_id = old.id, fresh.id
    report = app.tasks[PURGE_TASK]()
    with session_scope(migrated_database_url) as s:
        left = set(s.scalars(select(Job.id)))
    assert report["jobs"] == 1 and left == {fresh_id} and old_id not in left


def test_stored_preset_specs_keep_the_prompt_they_were_submitted_with():
    from tests.unit.core.conftest import build_tokenizer
    from workers.runners.interpret import spec_template

    tok = build_tokenizer()
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    # written before presets left the chat template's default system prompt out: it stays in
    assert "SmolLM" in spec_template({"preset": "summarize"}, tok).parts[0]
    assert spec_template({"preset": "summarize", "system": None}, tok).parts[0] == "<|im_start|>user\n"
    assert spec_template({"preset": "summarize", "system": "Be brief."}, tok).parts[0].startswith(
        "<|im_start|>system\nBe brief.<|im_end|>")
