"""`selfie audit ...`: prompt sets, audits, runs, reports and CSV export, over the same HTTP API as the pages."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from selfie_cli.errors import UserError, hint_for_status, http_detail

URL_OPTION = click.option("--url", envvar="SELFIE_URL", default="http://127.0.0.1:8000", show_default=True,
                          help="The API's base URL (env SELFIE_URL).")
KEY_OPTION = click.option("--api-key", envvar="SELFIE_API_KEY", default=None, help="Bearer API key (env SELFIE_API_KEY).")
FINAL = {"succeeded", "failed", "cancelled"}


def _client(url: str, api_key: str | None):
    from selfie_client import Client

    return Client(url, api_key, timeout=300)


def _call(client, method: str, path: str, **kw: Any) -> Any:
    """One request's JSON; a refusal (SelfieError) reaches the user as one line through selfie_cli.errors."""
    return client._request(method, path, **kw).json()


def _detail(res: Any) -> str:
    """An error response's detail (FastAPI's JSON), or its text when it is not JSON."""
    try:
        return http_detail(res.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return res.text


def _audit_id(client, audit: str) -> int:
    if audit.isdigit():
        return int(audit)
    for a in _call(client, "GET", "/v1/audits")["audits"]:
        if a["name"] == audit:
            return a["id"]
    raise UserError(f"no audit named {audit!r}", "`selfie audit list` shows the audits (names and ids)")


def _tokens(value: str) -> Any:
    if value == "all":
        return "all"
    if value.startswith("last:"):
        return {"last": int(value.split(":", 1)[1])}
    return [int(v) for v in value.split(",") if v.strip()]


def _detectors(example: str | None, detectors_file: str | None, keywords: str | None, regex: tuple[str, ...],
               concepts_file: str | None, min_relevancy: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if example:
        from selfie_jobs.audit_detectors import EXAMPLES

        if example not in EXAMPLES:
            raise click.BadParameter(f"known examples: {', '.join(EXAMPLES)}", param_hint="--example")
        out += EXAMPLES[example]
    if detectors_file:
        data = json.loads(Path(detectors_file).read_text())
        out += data if isinstance(data, list) else [data]
    if keywords:
        out.append({"kind": "keywords", "name": "keywords", "words": [w.strip() for w in keywords.split(",") if w.strip()],
                    "min_relevancy": min_relevancy})
    if regex:
        out.append({"kind": "regex", "name": "regex", "patterns": list(regex), "min_relevancy": min_relevancy})
    if concepts_file:
        out.append({"kind": "concepts", "name": "concepts", "concepts": json.loads(Path(concepts_file).read_text()),
                    "min_relevancy": min_relevancy})
    if not out:
        raise click.UsageError("give detectors: --example, --detectors FILE, --keywords, --regex or --concepts")
    return out


@click.group()
def audit() -> None:
    """Audits: run detectors over interpretations of many prompts, on demand or on a cron schedule."""


@audit.command("sets")
@URL_OPTION
@KEY_OPTION
def sets(url: str, api_key: str | None) -> None:
    """Prompt sets: uploaded ones and the built-in examples."""
    with _client(url, api_key) as c:
        data = _call(c, "GET", "/v1/prompt-sets")
    stored = {p["name"] for p in data["prompt_sets"]}
    for p in data["prompt_sets"]:
        click.echo(f"{p['id']:>4}  {p['name']:<28} {p['size']:>7} prompts  {p['source']:<8} {p['description']}")
    for name, info in data["builtin"].items():
        if name not in stored:
            click.echo(f"   -  {name:<28} (built-in, stored on first use)  {info['description']}")


@audit.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", required=True, help="Name of the new prompt set.")
@click.option("--description", default="")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None, help="Default: from the file name.")
@URL_OPTION
@KEY_OPTION
def upload(file: str, name: str, description: str, fmt: str | None, url: str, api_key: str | None) -> None:
    """Upload a JSONL or CSV prompt set (streamed from disk)."""
    data = {"name": name, "description": description}
    if fmt:
        data["format"] = fmt
    with _client(url, api_key) as c, open(file, "rb") as fh:
        out = _call(c, "POST", "/v1/prompt-sets", files={"file": (Path(file).name, fh)}, data=data)
    click.echo(f"prompt set {out['id']} {out['name']!r}: {out['size']} prompts")


@audit.command("create")
@click.argument("name")
@click.option("--prompt-set", required=True, help="Name of an uploaded or built-in prompt set.")
@click.option("--model", default=None)
@click.option("--layers", default="all", show_default=True, help='"all", "0,4,8" or "0:31:5".')
@click.option("--tokens", default="last:1", show_default=True, help='"all", "last:N" or "0,-1".')
@click.option("--template", default=None, help="Template preset (default: the model's).")
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@click.option("--k", type=int, default=1, show_default=True)
@click.option("--example", default=None, help="Detector example from the core: ethics, prompt-injection, harmful-knowledge.")
@click.option("--detectors", "detectors_file", default=None, type=click.Path(exists=True), help="JSON list of configs.")
@click.option("--keywords", default=None, help="Comma-separated keywords.")
@click.option("--regex", multiple=True, help="A regular expression; repeatable.")
@click.option("--concepts", "concepts_file", default=None, type=click.Path(exists=True),
              help='JSON {"concept": ["term", ...]}.')
@click.option("--min-relevancy", type=float, default=0.0, show_default=True)
@click.option("--schedule", default=None, help='cron expression, UTC (e.g. "0 3 * * *").')
@URL_OPTION
@KEY_OPTION
def create(name, prompt_set, model, layers, tokens, template, max_new_tokens, k, example, detectors_file, keywords,
           regex, concepts_file, min_relevancy, schedule, url, api_key) -> None:
    """Define an audit."""
    from selfie_client.client import selector

    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "k": k}
    if template:
        options["template"] = template
    body = {"name": name, "model": model, "prompt_set": prompt_set,
            "targets": {"layers": selector(layers), "tokens": _tokens(tokens)}, "options": options,
            "detectors": _detectors(example, detectors_file, keywords, regex, concepts_file, min_relevancy),
            "schedule": schedule}
    with _client(url, api_key) as c:
        out = _call(c, "POST", "/v1/audits", json={k: v for k, v in body.items() if v is not None})
    click.echo(f"audit {out['id']} {out['name']!r} on {out['model']}"
               + (f", next run {out['next_run_at']}" if out.get("next_run_at") else ""))


@audit.command("list")
@URL_OPTION
@KEY_OPTION
def list_audits(url: str, api_key: str | None) -> None:
    """Audits with their schedule and last run."""
    with _client(url, api_key) as c:
        audits = _call(c, "GET", "/v1/audits")["audits"]
    for a in audits:
        last = a.get("last_run") or {}
        click.echo(f"{a['id']:>4}  {a['name']:<24} {a['model']:<24} {a['prompt_set'] or '':<20} "
                   f"{a['schedule'] or 'manual':<14} {last.get('state', '-')} {last.get('flags', '')}")
    if not audits:
        click.echo("(no audits)")


@audit.command("schedule")
@click.argument("audit_ref", metavar="AUDIT")
@click.argument("cron")
@URL_OPTION
@KEY_OPTION
def schedule(audit_ref: str, cron: str, url: str, api_key: str | None) -> None:
    """Set the cron schedule of an audit ("off" removes it)."""
    with _client(url, api_key) as c:
        out = _call(c, "PATCH", f"/v1/audits/{_audit_id(c, audit_ref)}",
                    json={"schedule": None if cron == "off" else cron})
    click.echo(f"audit {out['id']}: schedule {out['schedule'] or 'off'}, next run {out['next_run_at'] or '-'}")


def _wait(c, run_id: int) -> dict[str, Any]:
    from selfie_cli.render import progress_bar

    told = None
    with progress_bar(f"run {run_id}", None, enabled=sys.stderr.isatty()) as update:
        while True:
            run = _call(c, "GET", f"/v1/audit-runs/{run_id}")
            p = run["progress"]
            update(done=p["interpretations_done"], total=max(1, p["interpretations_total"]),
                   status=f"{run['state']}, {p['flags']} flags")
            if p.get("waiting") and p["waiting"] != told:  # on a line of its own: a bar's line would cut it
                told = p["waiting"]
                click.echo(f"run {run_id}: {told}", err=True)
            if run["state"] in FINAL:
                return run
            time.sleep(1.0)


@audit.command("run")
@click.argument("audit_ref", metavar="AUDIT")
@click.option("--wait/--no-wait", default=False, help="Follow the run until it ends.")
@URL_OPTION
@KEY_OPTION
def run(audit_ref: str, wait: bool, url: str, api_key: str | None) -> None:
    """Start a run of an audit (id or name)."""
    with _client(url, api_key) as c:
        out = _call(c, "POST", f"/v1/audits/{_audit_id(c, audit_ref)}/runs")
        click.echo(f"run {out['id']}: {out['state']}  {out['links']['page']}")
        if wait:
            out = _wait(c, out["id"])
            click.echo(f"run {out['id']}: {out['state']}, {out['progress']['flags']} flags"
                       + (f" ({out['error']})" if out.get("error") else ""))
            if out["state"] != "succeeded":
                sys.exit(1)


@audit.command("status")
@click.argument("run_id", type=int)
@URL_OPTION
@KEY_OPTION
def status(run_id: int, url: str, api_key: str | None) -> None:
    """Progress of a run."""
    with _client(url, api_key) as c:
        out = _call(c, "GET", f"/v1/audit-runs/{run_id}")
    click.echo(json.dumps({k: out[k] for k in ("id", "audit_id", "state", "error", "progress")}, indent=1))


@audit.command("cancel")
@click.argument("run_id", type=int)
@URL_OPTION
@KEY_OPTION
def cancel(run_id: int, url: str, api_key: str | None) -> None:
    """Cancel a run and its open jobs."""
    with _client(url, api_key) as c:
        out = _call(c, "POST", f"/v1/audit-runs/{run_id}/cancel")
    click.echo(f"run {out['id']}: {out['state']}")


def _bars(rows: list[dict[str, Any]], label: str) -> list[str]:
    peak = max((r["flags"] for r in rows), default=0) or 1
    return [f"  {label} {r['key']:>4}  {'#' * max(1, round(30 * r['flags'] / peak)):<30} {r['flags']}" for r in rows]


@audit.command("report")
@click.argument("run_id", type=int)
@click.option("--top", type=int, default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@URL_OPTION
@KEY_OPTION
def report(run_id: int, top: int, as_json: bool, url: str, api_key: str | None) -> None:
    """Flags per layer and token position, top findings, and the diff against the previous run."""
    with _client(url, api_key) as c:
        rep = _call(c, "GET", f"/v1/audit-runs/{run_id}/report", params={"top": top})
    if as_json:
        click.echo(json.dumps(rep, indent=1, default=str))
        return
    lines = [f"run {rep['run_id']} ({rep['state']}): {rep['flags']} flags on {rep['flagged_prompts']} prompts",
             "flags per layer:", *_bars(rep["by_layer"], "layer"),
             "flags per token position (from the end):", *_bars(rep["by_token_from_end"], "token")]
    d = rep["diff"]
    lines.append("diff: first run" if d["previous_run_id"] is None else
                 f"diff vs run {d['previous_run_id']}: {d['new_count']} new, {d['gone_count']} gone")
    lines.append("top findings:")
    for f in rep["top"]:
        ctx = f.get("context") or {}
        lines.append(f"  {f['mean_relevancy']:.3f}  L{f['layer']:<3} t{f['token']:<4} {f['detector']}:{f['label']:<16} "
                     f"{f['text'].strip()[:50]!r}  in  …{ctx.get('before', '')}[{ctx.get('token', '')}]{ctx.get('after', '')}…")
    click.echo("\n".join(lines))


@audit.command("export")
@click.argument("run_id", type=int)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="-", help="CSV file (default: stdout).")
@click.option("--raw", is_flag=True, help="The text exactly as stored. Default: spreadsheet-safe (cells that would "
                                          "run as formulas are prefixed with ').")
@URL_OPTION
@KEY_OPTION
def export(run_id: int, output: str, raw: bool, url: str, api_key: str | None) -> None:
    """All findings of a run as CSV (streamed; spreadsheet-safe unless --raw)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = sys.stdout.buffer if output == "-" else open(output, "wb")  # noqa: SIM115 - closed below
    try:
        params = {"format": "csv", "csv": "raw" if raw else "safe"}
        with httpx.stream("GET", f"{url.rstrip('/')}/v1/audit-runs/{run_id}/findings", params=params,
                          headers=headers, timeout=300) as res:
            if res.status_code >= 400:
                res.read()
                raise UserError(f"the server answered {res.status_code}: {_detail(res)}", hint_for_status(res.status_code))
            for piece in res.iter_bytes():
                out.write(piece)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
