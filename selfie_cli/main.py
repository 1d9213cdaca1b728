"""`selfie`: one console script for the whole service. Heavy modules are imported inside the commands only."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from selfie_cli.database import cli_session
from selfie_cli.errors import SelfieGroup, UserError
from selfie_cli.retention import DURATION, describe, purge, set_key_ttl

URL_OPTION = click.option("--url", envvar="SELFIE_URL", default="http://127.0.0.1:8000", show_default=True,
                          help="The API's base URL (env SELFIE_URL).")
THREADS_OPTION = click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="torch CPU threads (default: half the usable cores, at most 8; 1 on a 2-core machine; "
         "see selfie_core/threads.py).")
KEY_OPTION = click.option("--api-key", envvar="SELFIE_API_KEY", default=None,
                          help="Bearer API key (env SELFIE_API_KEY); not needed with `selfie up`.")


def _client(url: str, api_key: str | None):
    from selfie_client import Client

    return Client(url, api_key)


def _fail(exc: Exception) -> None:
    from selfie_cli.errors import translate

    raise (translate(exc) or UserError(str(exc))) from exc


def _check_selector(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--layers / --tokens: refused as a usage error here, before anything loads or is sent."""
    from selfie_client.client import selector

    try:
        selector(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


SERVED_MODEL_HELP = "Served model name (default: the service's default model)."
LOCAL_MODEL_HELP = ("A model added with `selfie models add` (loaded from its folder, in its dtype), the built-in "
                    "model's name or a hub id (default: the settings' default model).")


def target_options(model_help: str):
    """Options shared by `submit` and `interpret`: what to interpret and how."""
    return lambda func: _with_target_options(func, model_help)


def _with_target_options(func, model_help: str):
    options = [
        click.option("--model", default=None, help=model_help),
        click.option("--layers", default="all", show_default=True, callback=_check_selector,
                     help='"all", a list "0,4,8" or a range "0:31:5" (hidden_states indices).'),
        click.option("--tokens", default="all", show_default=True, callback=_check_selector,
                     help='"all", a list "0,-1" or a range "-4:" (negative = from the end).'),
        click.option("--pair", "pairs", multiple=True, metavar="LAYER,TOKEN",
                     help="Explicit (layer, token) pair; repeatable; replaces --layers/--tokens."),
        click.option("--template", default=None, help="Preset name (summarize, describe, ...)."),
        click.option("--system", default=None,
                     help="A system prompt for the preset (default: none; a chat template's own is left out)."),
        click.option("--k", "k", type=int, default=1, show_default=True, help="Injection layer."),
        click.option("--mode", "injection_mode", type=click.Choice(["replace", "blend", "add"]), default="replace"),
        click.option("--strength", "injection_strength", type=float, default=1.0, show_default=True),
        click.option("--max-new-tokens", type=int, default=30, show_default=True),
        click.option("--sample/--greedy", "do_sample", default=False, help="Sample instead of greedy decoding."),
        click.option("--temperature", type=float, default=1.0),
        click.option("--top-p", type=float, default=1.0),
        click.option("--seed", type=int, default=None),
        click.option("--grounding-threshold", type=click.FloatRange(0, 1), default=None,
                     help="Mean relevancy under which an interpretation is not grounded (default: the service's, "
                          "0.05)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _check_model_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A missing local folder is refused before torch loads (seconds), by load_model's rule for what is a path."""
    from pathlib import Path

    if value and value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().is_dir():
        raise click.BadParameter(f"no model folder at {value}", ctx=ctx, param=param)
    return value


def _parse_pairs(pairs: tuple[str, ...]) -> list[tuple[int, int]] | None:
    if not pairs:
        return None
    out = []
    for pair in pairs:
        try:
            layer, token = (int(v) for v in pair.split(","))
        except ValueError:
            raise click.BadParameter(f"{pair!r}: use LAYER,TOKEN", param_hint="--pair") from None
        out.append((layer, token))
    return out


def _set_debug(_ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:  # the environment, so that the error handling (selfie_cli.errors) and child processes see it
        os.environ["SELFIE_DEBUG"] = "1"
    return value


@click.group(cls=SelfieGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="selfie")
@click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=_set_debug,
              help="Show the full traceback of an error instead of its one-line message (env SELFIE_DEBUG=1).")
def cli() -> None:
    """SelfIE as a service: ask a language model what its own hidden states mean.

    Errors are reported in a line or two: exit status 2 for a bad command line, 1 for anything else."""


# --------------------------------------------------------------------------------------------------------------
# running the service
# --------------------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--model", default=None, help="Model the worker serves (default: settings' default model).")
@click.option("--model-path", default=None, help="Load the worker's weights from this folder or hub id.")
@click.option("--demo", is_flag=True, help="Submit a sample job, show progress and print its layer x token table.")
@click.option("--exit", "exit_after", is_flag=True, help="With --demo: stop the stack after the table.")
@click.option("--prompt", default=None, help="The demo's prompt.")
@click.option("--flower", is_flag=True, help="Also run Flower (basic auth) to watch the worker.")
@click.option("--flower-port", type=int, default=5555, show_default=True)
@click.option("--beat/--no-beat", default=True, show_default=True, help="Run Celery beat (the reconciler).")
@click.option("--worker/--no-worker", "with_worker", default=True, show_default=True)
@click.option("--auth/--no-auth", default=False, show_default=True,
              help="Require API keys; local mode runs without them.")
def up(**options: Any) -> None:
    """The whole stack on this machine: Redis (embedded unless SELFIE_REDIS_URL is set), SQLite (unless
    SELFIE_DATABASE_URL is set), migrations, the API, one worker and beat; Ctrl-C stops it all."""
    from selfie_cli.stack import run_up

    sys.exit(run_up(**options))


def _gpus_option(ctx, param, value):
    if value is None:
        return None
    from workers.gpus import parse_gpus

    try:
        return parse_gpus(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@cli.command()
@click.option("--model", required=False, default=None, help="Served model name (its queue and card).")
@click.option("--gpu", type=click.IntRange(min=0), default=None, help="CUDA device index to pin this worker to.")
@click.option("--gpus", default=None, callback=_gpus_option, metavar="0,1,...",
              help="Spread the model over these CUDA devices (a device_map; see workers/gpus.py for the memory rule).")
@click.option("--model-path", default=None, help="Load the weights from here (local folder or hub id).")
@click.option("--device", default=None, help="cpu, cuda:0 ... (default: cuda:0 with --gpu, else cpu).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Default: the dtype the model was added with (selfie models add), else float32.")
@click.option("--concurrency", type=int, default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Rows per engine batch (default: the engine's choice).")
@click.option("--hostname", default=None, help="Celery node name.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="CUDA: replay the engine's decode steps as CUDA graphs (no effect on the CPU).")
@click.option("--decode-attention", type=click.Choice(["sdpa", "triton"]), default="sdpa", show_default=True,
              help="How those steps attend: the model's SDPA attention or the engine's Triton kernel.")
@click.option("--rms-norm", type=click.Choice(["model", "triton"]), default="model", show_default=True,
              help="RMSNorm through the model's own modules or the engine's Triton kernel.")
@THREADS_OPTION
def worker(model, gpu, gpus, model_path, device, dtype, concurrency, batch_size, hostname, loglevel, cuda_graphs,
           decode_attention, rms_norm, threads) -> None:
    """Serve one model on one device, or spread over several GPUs with --gpus (blocks)."""
    from selfie_jobs.settings import get_settings
    from workers.launch import run_worker

    if gpu is not None and gpus:
        raise click.UsageError("give --gpu N or --gpus N,M,..., not both")
    if gpus and len(gpus) > 1 and device:
        raise click.UsageError("--device names one device; a model spread over --gpus has several")
    if gpus or gpu is not None:  # numbers beyond an inherited CUDA_VISIBLE_DEVICES are a usage error, not a crash
        from workers.gpus import visible_devices

        try:
            visible_devices(gpus or (gpu,), os.environ.get("CUDA_VISIBLE_DEVICES"))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gpus" if gpus else "--gpu") from exc
    run_worker(model or get_settings().default_model, gpu, gpus=gpus, model_path=model_path, device=device, dtype=dtype,
               concurrency=concurrency, batch_size=batch_size, hostname=hostname, loglevel=loglevel,
               cuda_graphs=cuda_graphs, decode_attention=decode_attention, rms_norm=rms_norm, threads=threads)


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--schedule", default=None, help="Beat's schedule file.")
def beat(loglevel: str, schedule: str | None) -> None:
    """Run Celery beat: the reconciler and scheduled audits (blocks)."""
    from workers.launch import run_beat

    run_beat(loglevel=loglevel, schedule_file=schedule)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", "processes", type=int, default=1, show_default=True, help="uvicorn worker processes.")
@click.option("--log-level", default="info", show_default=True)
def api(host: str, port: int, processes: int, log_level: str) -> None:
    """Serve the HTTP API (uvicorn api.main:create_app --factory)."""
    import uvicorn

    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, workers=processes, log_level=log_level)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=5555, show_default=True)
def flower(host: str, port: int) -> None:
    """Run Flower (basic auth from SELFIE_FLOWER_USER / SELFIE_FLOWER_PASSWORD, required) on the broker."""
    import os

    from selfie_cli.flower import FlowerConfigError, flower_command
    from selfie_jobs.settings import get_settings

    settings = get_settings()
    password = settings.flower_password.get_secret_value() if settings.flower_password else None
    try:
        argv, env = flower_command(settings.flower_user, password, host=host, port=port)
    except FlowerConfigError as exc:
        _fail(exc)
    os.execve(argv[0], argv, {**os.environ, **env})  # the credentials in the environment, not in argv


@cli.command()
@click.option("--database-url", default=None, help="Default: settings (SELFIE_DATABASE_URL or the SQLite file).")
def migrate(database_url: str | None) -> None:
    """Bring the database schema to the newest revision."""
    from selfie_jobs.migrate import upgrade
    from selfie_jobs.settings import get_settings

    url = database_url or get_settings().resolved_database_url()
    upgrade(url)
    click.echo(f"database at the newest schema: {_safe_url(url)}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --------------------------------------------------------------------------------------------------------------
# using the service
# --------------------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("prompts", nargs=-1)
@target_options(SERVED_MODEL_HELP)
@click.option("--vectors", "vectors_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Interpret your own vectors instead of PROMPTS: a .npy or .safetensors file of shape "
                   "(n, hidden_size), or a .json file {\"vectors\": [[...]], \"labels\": [...]} or "
                   "{\"expressions\": [{\"terms\": [{\"coef\", \"prompt\", \"layer\", \"token\"}]}]}.")
@click.option("--label", "labels", multiple=True, help="A label per vector, in order (with --vectors); repeatable.")
@click.option("--tensor", default=None, help="The tensor to use in a .safetensors file holding several.")
@click.option("--lens", "lenses", multiple=True, type=click.Choice(["logit", "identity"]),
              help="Read the PROMPTS' states with this lens instead of interpreting them (a lenses job: the logit "
                   "lens, the identity patch); repeatable.")
@click.option("--top-k", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Tokens kept per lens (with --lens).")
@click.option("--priority", type=click.IntRange(0, 9), default=5, show_default=True, help="9 = most urgent.")
@click.option("--idempotency-key", default=None)
@click.option("--ttl", "ttl_seconds", type=DURATION, default=None, metavar="DURATION",
              help="How long the finished job is kept (e.g. 3600, 12h, 30d); default: your key's, else the "
                   "service's. Never purged within a day of its submission.")
@click.option("--variant", default=None, metavar="ID",
              help="Run on a model variant (an edit job's result, `selfie variants`) instead of the model's own "
                   "weights; it must be of the job's model.")
@click.option("--wait/--no-wait", default=False, help="Wait with a progress bar, then print the table.")
@URL_OPTION
@KEY_OPTION
def submit(prompts, url, api_key, wait, pairs, layers, tokens, vectors_file, labels, tensor, lenses, top_k,
           **options) -> None:
    """Submit a job for one or more PROMPTS (or for the vectors of a --vectors file; or read PROMPTS' states with
    --lens); prints its id and link."""
    if bool(prompts) == bool(vectors_file):
        raise click.UsageError("give PROMPTS or --vectors FILE (one of them)")
    if lenses and vectors_file:
        raise click.UsageError("--lens reads the states of PROMPTS; it does not take --vectors")
    if lenses:  # a lens reading generates nothing: options that would be dropped are refused instead
        ctx = click.get_current_context()
        flags = {p.name: p.opts[0] for p in ctx.command.params}
        given = [flags[name] for name in options
                 if name not in ("model", "priority", "idempotency_key", "variant", "ttl_seconds")
                 and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} set how an interpretation is generated; a --lens job "
                                   "generates nothing (leave them out)")
    threshold = options.pop("grounding_threshold")
    if threshold is not None:
        options["grounding"] = {"min_mean_relevancy": threshold}
    with _client(url, api_key) as client:
        if vectors_file:
            accepted = client.submit_vector_file(vectors_file, labels=list(labels) or None, tensor=tensor, **options)
        elif lenses:
            accepted = client.submit_lenses(list(prompts), layers=layers, tokens=tokens, pairs=_parse_pairs(pairs),
                                            top_k=top_k, lenses=list(dict.fromkeys(lenses)), model=options["model"],
                                            priority=options["priority"],
                                            idempotency_key=options["idempotency_key"], variant=options["variant"],
                                            ttl_seconds=options["ttl_seconds"])
        else:
            accepted = client.submit(list(prompts), layers=layers, tokens=tokens, pairs=_parse_pairs(pairs),
                                     **options)
        what = {"vectors": "vectors", "lenses": "lens readings"}.get(accepted.get("kind"), "interpretations")
        click.echo(f"job {accepted['id']}: {accepted['total']} {what} in {accepted['chunks']} chunks")
        click.echo(f"explore: {accepted['links']['page']}")
        click.echo(f"status:  {accepted['link']}")
        if wait:
            _wait_and_show(client, accepted["id"])


def _wait_and_show(client, job_id: str) -> None:
    from selfie_cli.render import print_rows, print_table, status_line

    status = client.wait(job_id)
    click.echo(status_line(status))
    if status["state"] == "succeeded" and status.get("kind", "interpret") != "interpret":
        print_rows(client.rows(job_id))
    elif status["state"] == "succeeded":
        from selfie_cli.render import console, print_baseline

        df = client.results(job_id)
        print_baseline(status, console())
        for prompt in status["prompts"]:
            click.echo(f"\nprompt {prompt['index']}: {prompt['text']}")
            print_table(df, prompt["index"])


@cli.command()
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it finishes.")
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
@URL_OPTION
@KEY_OPTION
def status(job_id: str, wait: bool, as_json: bool, url: str, api_key: str | None) -> None:
    """A job's state, progress, queue position and timings."""
    from selfie_cli.render import status_line

    with _client(url, api_key) as client:
        st = client.wait(job_id) if wait else client.status(job_id)
    click.echo(json.dumps(st, indent=2) if as_json else status_line(st))


@cli.command()
@click.argument("job_id")
@URL_OPTION
@KEY_OPTION
def cancel(job_id: str, url: str, api_key: str | None) -> None:
    """Cancel a job (its queued chunks are dropped)."""
    with _client(url, api_key) as client:
        out = client.cancel(job_id)
    click.echo(f"job {out['id']}: {out['state']}" + ("" if out["cancelled"] else " (already finished)"))


TABLE_OPTIONS = [
    click.option("--width", type=click.IntRange(min=4), default=24, show_default=True,
                 help="Table column width; longer texts wrap onto more lines."),
    click.option("--relevancy/--no-relevancy", "show_relevancy", default=True, show_default=True,
                 help="Print each cell's mean relevancy under its text."),
    click.option("--shade/--no-shade", default=True, show_default=True,
                 help="Shade each cell by its mean relevancy (on a color terminal; white .. deep blue)."),
]


def table_options(func):
    for option in reversed(TABLE_OPTIONS):
        func = option(func)
    return func


@cli.command()
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--prompt", type=int, default=None, help="Only this prompt index.")
@click.option("--layer-min", type=int, default=None)
@click.option("--layer-max", type=int, default=None)
@click.option("--token", type=int, default=None, help="Only this token index.")
@click.option("--min-relevancy", type=float, default=None)
@click.option("--search", "q", default=None, help="Interpretation text contains this (any case).")
@click.option("--sort", default="position", show_default=True,
              type=click.Choice(["position", "relevancy", "-relevancy", "layer", "-layer", "token", "created"]))
@table_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None, help="Write to a file.")
@click.option("--raw", is_flag=True, help="CSV: the text exactly as stored. Default: spreadsheet-safe (cells that "
                                          "would run as formulas are prefixed with ').")
@URL_OPTION
@KEY_OPTION
def results(job_id, fmt, width, show_relevancy, shade, output, raw, url, api_key, **filters) -> None:
    """A job's interpretations: a layer x token table per prompt, or CSV / JSON rows (a vectors job: one row per
    vector, in its kind's columns; the filters apply to interpretations only and are refused for another kind)."""
    import io

    buffer = io.StringIO()
    with _client(url, api_key) as client:
        kind = client.status(job_id, include_prompts=False).get("kind", "interpret")
        if kind != "interpret":
            flags = {p.name: p.opts[0] for p in click.get_current_context().command.params}
            given = [flags[name] for name, value in filters.items()
                     if value is not None and (name, value) != ("sort", "position")]
            if given:  # they would be dropped silently: the rows would look filtered and be all of them
                raise click.UsageError(f"{' '.join(given)} filter an interpret job's interpretations; job {job_id} "
                                       f"is a {kind} job: its rows have no filters (leave them out)")
            if fmt == "table" and not output:  # straight to the terminal: shaded, as wide as it is
                from selfie_cli.render import print_rows

                print_rows(client.rows(job_id), width=width, shade=shade)
                return
            buffer.write(_kind_rows(client, job_id, fmt, width, safe=not raw))
        elif fmt == "csv":
            # a CSV file from the command line is likely opened in a spreadsheet: safe unless --raw
            buffer.write(client.results_csv(job_id, safe=not raw, **filters))
        else:
            rows = list(client.iter_results(job_id, **filters))
            if fmt == "json":
                buffer.write(json.dumps(rows, indent=1))
            elif not output:
                _tables(client.status(job_id), rows, width=width, relevancy=show_relevancy, shade=shade)
                return
            else:
                _tables(client.status(job_id), rows, width=width, relevancy=show_relevancy, shade=False, file=buffer)
    text = buffer.getvalue()
    if output:
        with open(output, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        click.echo(f"written to {output}")
    else:
        click.echo(text, nl=not text.endswith("\n"))


@cli.command()
@click.argument("query")
@click.option("--model", default=None, help="Only this model's results.")
@click.option("--job", default=None, help="Only this job's results.")
@click.option("--audit-run", type=click.IntRange(min=0), default=None, help="Only this audit run's results.")
@click.option("--kind", type=click.Choice(["interpret", "vectors"]), default=None, help="Only this kind's results.")
@click.option("--layer-min", type=click.IntRange(min=0), default=None)
@click.option("--layer-max", type=click.IntRange(min=0), default=None)
@click.option("--since", type=click.DateTime(), default=None, help="Results stored at or after (UTC).")
@click.option("--until", type=click.DateTime(), default=None, help="Results stored before (UTC).")
@click.option("--grounded/--ungrounded", default=None,
              help="Only interpretations judged grounded (or not); leaves out vector interpretations.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--width", type=click.IntRange(min=4), default=60, show_default=True, help="Table text width.")
@URL_OPTION
@KEY_OPTION
def search(query, limit, fmt, width, url, api_key, since, until, **filters) -> None:
    """Results (of every job you may read) whose text holds every word of QUERY; "quoted phrases" keep their
    order. Newest first."""
    from selfie_cli.render import print_search

    times = {"since": since.isoformat() if since else None, "until": until.isoformat() if until else None}
    with _client(url, api_key) as client:
        df = client.search(query, limit=limit, **filters, **times)
    if fmt == "csv":
        click.echo(df.to_csv(index=False), nl=not len(df))  # to_csv ends with a newline unless there is no row
    elif fmt == "json":
        click.echo(df.to_json(orient="records", date_format="iso", indent=1))
    else:
        print_search(df, width=width)


def _kind_rows(client, job_id: str, fmt: str, width: int, *, safe: bool) -> str:
    """The rows of a job of a kind other than interpret, in the kind's own columns."""
    import io

    from selfie_cli.render import print_rows

    if fmt == "csv":
        return client.rows_csv(job_id, safe=safe)
    if fmt == "json":
        return json.dumps(list(client.iter_rows(job_id)), indent=1)
    buffer = io.StringIO()
    print_rows(client.rows(job_id), width=width, shade=False, file=buffer)  # a file: plain text, no colors
    return buffer.getvalue()


def _tables(status: dict[str, Any], rows: list[dict[str, Any]], *, file: Any = None, **table: Any) -> None:
    import pandas as pd

    from selfie_cli.render import console, print_baseline, print_table

    df = pd.DataFrame(rows, columns=["prompt_index", "layer", "token", "source_token", "text", "mean_relevancy",
                                     "grounded", "ungrounded_reason"])
    out = console(file)
    print_baseline(status, out)
    shown = False
    for prompt in status["prompts"]:
        if (df["prompt_index"] == prompt["index"]).any():
            out.print(f"prompt {prompt['index']}: {prompt['text']}")
            print_table(df, prompt["index"], file=file, **table)
            out.print()
            shown = True
    if not shown:
        out.print("(no interpretations)")


@cli.command()
@click.argument("prompt")
@target_options(LOCAL_MODEL_HELP)
@click.option("--model-path", default=None, callback=_check_model_path,
              help="Load the weights from here instead of the model name.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Default: the dtype the model was added with (selfie models add), else float32.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@THREADS_OPTION
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@table_options
def interpret(prompt, fmt, width, show_relevancy, shade, **options) -> None:
    """Interpret PROMPT in this process with the engine (no API, no queue; the database only for the catalogue)."""
    from selfie_cli.local import interpret_locally

    df = interpret_locally(prompt, pairs=_parse_pairs(options.pop("pairs")), **options)
    if fmt == "csv":
        click.echo(df.to_csv(index=False), nl=False)
    else:
        from selfie_cli.render import print_table

        print_table(df, 0, width=width, relevancy=show_relevancy, shade=shade)


# --------------------------------------------------------------------------------------------------------------
# API keys
# --------------------------------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """API keys (stored hashed in the database named by the settings)."""


@keys.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="This key sees every job.")
@click.option("--daily-quota", type=int, default=None, help="Interpretations per day (default: settings).")
@click.option("--job-ttl", type=DURATION, default=None,
              help="How long its jobs are kept after they finish (3600, 12h, 30d; default: the service's).")
def keys_create(name: str, admin: bool, daily_quota: int | None, job_ttl: int | None) -> None:
    """Make a key; its secret is shown once."""
    from selfie_jobs.auth import create_key

    with cli_session() as session:
        row, secret = create_key(session, name, admin=admin, daily_quota=daily_quota, job_ttl_seconds=job_ttl)
        key_id = row.id
    click.echo(f"key {key_id} ({name}{', admin' if admin else ''}); the secret is shown only now:")
    click.echo(secret)


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
def keys_list(include_revoked: bool) -> None:
    """Keys: id, prefix, name, admin, quota, job time to live, created, revoked."""
    from selfie_jobs.auth import list_keys

    with cli_session() as session:
        rows = list_keys(session, include_revoked=include_revoked)
        lines = [
            f"{r.id:>4}  {r.prefix}…  {r.name:<20}  {'admin' if r.is_admin else '     '}  "
            f"quota={r.daily_quota or '-'}  job-ttl={describe(r.job_ttl_seconds) if r.job_ttl_seconds else '-'}  "
            f"created={r.created_at:%Y-%m-%d %H:%M}"
            + (f"  revoked={r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "")
            for r in rows
        ]
    click.echo("\n".join(lines) if lines else "(no keys)")


@keys.command("revoke")
@click.argument("key")
def keys_revoke(key: str) -> None:
    """Revoke a key by id or prefix; its scheduled audits stop and its open audit runs are cancelled."""
    from selfie_jobs.audits import stop_key_audits
    from selfie_jobs.auth import revoke_key

    with cli_session() as session:
        try:
            row = revoke_key(session, key)
        except ValueError as exc:
            _fail(exc)
        if row is None:
            raise UserError(f"no key {key!r}", "`selfie keys list` shows the keys (ids and prefixes)")
        key_id = row.id
        stopped, cancelled = stop_key_audits(session, key_id)
    click.echo(f"key {key_id} revoked; schedules stopped: {len(stopped)} audit(s)"
               + (f" ({', '.join(map(str, stopped))})" if stopped else "")
               + f"; open audit runs cancelled: {len(cancelled)}")



@keys.command("ttl", context_settings={"ignore_unknown_options": True})  # '-1' is a bad duration, not an option
@click.argument("key")
@click.argument("duration", type=DURATION)
def keys_ttl(key: str, duration: int | None) -> None:
    """Set how long KEY's jobs are kept after they finish (3600, 12h, 30d), or `none` for the service's default.

    Applies to the key's jobs already stored too, at the next purge, except those that asked for their own."""
    set_key_ttl(key, duration)


def _register_audit_commands() -> None:
    from selfie_cli.audit import audit
    from selfie_cli.edit import edit
    from selfie_cli.generate import generate
    from selfie_cli.models import models
    from selfie_cli.variants import variants

    cli.add_command(audit)
    cli.add_command(edit)
    cli.add_command(generate)
    cli.add_command(models)
    cli.add_command(variants)
    cli.add_command(purge)


_register_audit_commands()

if __name__ == "__main__":
    cli()
