"""`selfie edit supervised ...` and `selfie edit reinforce ...`: submit a model edit over the HTTP API
(`Client.edit_supervised` / `edit_reinforce`), and with --wait show the variant it stored: its losses per epoch and
its evaluations on the base model and on the variant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from selfie_cli.errors import UserError

URL_OPTION = click.option("--url", envvar="SELFIE_URL", default="http://127.0.0.1:8000", show_default=True,
                          help="The API's base URL (env SELFIE_URL).")
KEY_OPTION = click.option("--api-key", envvar="SELFIE_API_KEY", default=None, help="Bearer API key (env SELFIE_API_KEY).")


def _common(func):
    for option in reversed([
        click.option("--model", default=None, help="Served model name (default: the service's default model)."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: the kind's measured one (supervised 100, reinforce 30)."),
        click.option("--lr", type=float, default=None, help="Adam's learning rate (default: supervised 3e-4, reinforce 1e-3)."),
        click.option("--seed", type=click.IntRange(min=0), default=None),
        click.option("--knowledge", is_flag=True, help="Also evaluate knowledge preservation (built-in facts)."),
        click.option("--facts", "facts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="Knowledge preservation on these facts instead: a CSV with 'prompt' and "
                     "'attribute' columns (the original's filtered_known_1000_with_output.csv works)."),
        click.option("--behaviours", "behaviours_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="Harmful-behaviour check: requests, one per line, asked plainly and inside "
                     "the prompt-injection story (needs --behaviour-keywords)."),
        click.option("--behaviour-keywords", default=None,
                     help="Comma-separated words that flag a response of the behaviour check as harmful."),
        click.option("--eval-limit", type=click.IntRange(min=1), default=None,
                     help="Use only the first N facts and the first N requests of those files."),
        click.option("--template", default=None, help="The interpretations' template: a preset name (default: the "
                     "kind's; reinforce uses the notebook's 'materials mentioned' prompt)."),
        click.option("--priority", type=click.IntRange(0, 9), default=None, help="9 = most urgent (default 5)."),
        click.option("--idempotency-key", default=None, help="Resubmitting with the same key returns the same job."),
        click.option("--ttl", "ttl_seconds", type=click.IntRange(min=1), default=None,
                     help="Seconds the finished job (and its variant) is kept (default: the key's, then the service's)."),
        click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the variant."),
        click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON."),
        URL_OPTION, KEY_OPTION,
    ]):
        func = option(func)
    return func


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    return text


def _target_vector(path: Path) -> list[float]:
    """The target vector from a JSON file: a list of numbers, {"vector": [...]}, or {"vectors": [[...]]} with one
    vector (the shape `selfie submit --vectors` takes)."""
    try:
        data = json.loads(_read(path))
    except ValueError as exc:
        raise UserError(f"{path} is not JSON: {exc}") from exc
    if isinstance(data, dict):
        if "vector" in data:
            data = data["vector"]
        elif isinstance(data.get("vectors"), list) and len(data["vectors"]) == 1:
            data = data["vectors"][0]
    if not isinstance(data, list) or not data or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
        raise UserError(f"{path}: the target vector must be a JSON list of numbers, {{\"vector\": [...]}} or "
                        "{\"vectors\": [[...]]} with one vector")
    return [float(v) for v in data]


def _options(epochs, lr, seed, knowledge, model, facts_file, behaviours_file, behaviour_keywords, eval_limit,
             template, priority, idempotency_key, ttl_seconds, k, max_new_tokens) -> dict[str, Any]:
    from selfie_client.edits import behaviours_from_file, evaluations, facts_from_csv

    out: dict[str, Any] = {"epochs": epochs, "lr": lr, "seed": seed, "model": model, "priority": priority,
                           "idempotency_key": idempotency_key, "ttl_seconds": ttl_seconds, "k": k,
                           "max_new_tokens": max_new_tokens,
                           "template": {"preset": template} if template is not None else None}
    if (behaviours_file is None) != (behaviour_keywords is None):
        raise click.UsageError("--behaviours and --behaviour-keywords go together")
    if eval_limit is not None and facts_file is None and behaviours_file is None:
        raise click.UsageError("--eval-limit cuts the --facts and --behaviours files; the built-in facts of "
                               "--knowledge are always asked in full")
    try:
        facts = facts_from_csv(facts_file, eval_limit) if facts_file is not None else knowledge
        requests = behaviours_from_file(behaviours_file, eval_limit) if behaviours_file is not None else None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    words = [w.strip() for w in (behaviour_keywords or "").split(",") if w.strip()]
    if behaviour_keywords is not None and not words:
        raise click.UsageError("--behaviour-keywords needs at least one word")
    detector = {"kind": "keywords", "name": "harmful", "words": words} if words else None
    out["evaluations"] = evaluations(knowledge=facts, behaviours=requests, detector=detector) or None
    return {k: v for k, v in out.items() if v is not None}


def _run(url, api_key, call, as_json: bool, wait: bool) -> None:
    from selfie_cli.main import _client, _fail
    from selfie_cli.render import evaluation_lines

    client = _client(url, api_key)
    try:
        answer = call(client)
    except Exception as exc:  # noqa: BLE001 - translated into one line for the user (selfie_cli.errors)
        _fail(exc)
    if as_json or not wait:
        click.echo(json.dumps(answer, indent=2, default=str) if as_json else f"job {answer['id']} {answer['state']}"
                   f" ({answer['link']})")
        return
    variant = answer["variant"]
    if variant is None:
        raise UserError(f"job {answer['job_id']} finished without a variant")
    click.echo(f"variant {variant['id']} ({variant['method']}, layer {variant['layer']}, sha256 {variant['sha256'][:12]})")
    for row in variant["losses"]:
        figures = ", ".join(f"{k} {row[k]:.6g}" for k in ("loss", "edit_loss", "keep_loss", "bad_share")
                            if row.get(k) is not None)
        click.echo(f"  epoch {row['epoch']}: {figures}")
    for line in evaluation_lines(variant["evaluations"]):
        click.echo(line)
    click.echo(f"page: {url.rstrip('/')}/ui/variants/{variant['id']}")


@click.group()
def edit() -> None:
    """Model edits: train one block's MLP through hidden states (Supervised or Reinforcement Control)."""


@edit.command()
@click.option("--prompt", required=True, help="The source prompt.")
@click.option("--layer", type=int, required=True, help="The source layer (1..depth: block layer-1's MLP changes).")
@click.option("--token", type=int, required=True, help="The source token (negative from the end).")
@click.option("--target-prompt", default=None, help="The target state's prompt (with --target-layer/--target-token).")
@click.option("--target-layer", type=int, default=None)
@click.option("--target-token", type=int, default=None)
@click.option("--target-vector", "target_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A JSON file with the target vector (hidden-size numbers).")
@click.option("--reference-texts", "refs_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Reference texts, one per line (default: the built-in set).")
@click.option("--beta", type=float, default=None)
@click.option("--anchor", type=click.Choice(["original", "current"]), default=None)
@click.option("--refs-per-epoch", type=click.IntRange(min=1), default=None)
@click.option("--k", type=click.IntRange(min=0), default=None, help="Injection layer of the interpretations shown.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Tokens of each interpretation shown.")
@_common
def supervised(prompt, layer, token, target_prompt, target_layer, target_token, target_file, refs_file, beta, anchor,
               refs_per_epoch, k, max_new_tokens, epochs, lr, seed, knowledge, facts_file, behaviours_file,
               behaviour_keywords, eval_limit, template, priority, idempotency_key, ttl_seconds, wait, as_json, model,
               url, api_key) -> None:
    """Supervised Control: move a source state to a target state or vector."""
    from selfie_client.edits import state_ref

    target = None
    if target_prompt is not None:
        if target_layer is None or target_token is None:
            raise click.UsageError("--target-prompt needs --target-layer and --target-token")
        target = state_ref(target_prompt, target_layer, target_token)
    if (target is None) == (target_file is None):
        raise click.UsageError("give a target: --target-prompt (with layer and token) or --target-vector")
    vector = _target_vector(target_file) if target_file is not None else None
    refs = [t for t in _read(refs_file).splitlines() if t.strip()] if refs_file is not None else None
    options = {**_options(epochs, lr, seed, knowledge, model, facts_file, behaviours_file, behaviour_keywords,
                            eval_limit, template, priority, idempotency_key, ttl_seconds, k, max_new_tokens),
               **{name: v for name, v in {"beta": beta, "anchor": anchor, "refs_per_epoch": refs_per_epoch}.items()
                  if v is not None}}
    _run(url, api_key, lambda c: c.edit_supervised(state_ref(prompt, layer, token), target=target,
                                                   target_vector=vector, reference_texts=refs, wait=wait,
                                                   progress=not as_json, **options), as_json, wait)


@edit.command()
@click.option("--prompt", required=True)
@click.option("--layer", type=int, required=True, help="1..depth: block layer-1's MLP changes.")
@click.option("--keywords", default=None, help="Judge: reject interpretations with any of these comma-separated words.")
@click.option("--judge", "judge_json", default=None,
              help='Judge as JSON, e.g. \'{"type": "model"}\' (the model judges itself) or an audit detector.')
@click.option("--k", type=click.IntRange(min=0), default=None, help="Injection layer of the interpretations.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None)
@_common
def reinforce(prompt, layer, keywords, judge_json, k, max_new_tokens, epochs, lr, seed, knowledge, facts_file,
              behaviours_file, behaviour_keywords, eval_limit, template, priority, idempotency_key, ttl_seconds, wait,
              as_json, model, url, api_key) -> None:
    """Reinforcement Control: push a prompt's states away from what a judge rejects."""
    if keywords is not None and judge_json is not None:
        raise click.UsageError("give one judge: --keywords or --judge, not both")
    if keywords is None and judge_json is None:
        raise click.UsageError("give a judge: --keywords or --judge")
    if keywords is not None:
        judge = {"type": "keywords", "words": [w.strip() for w in keywords.split(",") if w.strip()]}
    else:
        try:
            judge = json.loads(judge_json)
        except ValueError as exc:
            raise click.UsageError(f"--judge is not JSON: {exc}") from None
    options = _options(epochs, lr, seed, knowledge, model, facts_file, behaviours_file, behaviour_keywords,
                       eval_limit, template, priority, idempotency_key, ttl_seconds, k, max_new_tokens)
    _run(url, api_key, lambda c: c.edit_reinforce(prompt, layer, judge, wait=wait, progress=not as_json, **options),
         as_json, wait)
