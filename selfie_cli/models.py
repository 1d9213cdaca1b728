"""`selfie models add|list|remove`: the model catalogue, in the service's database.

`selfie models add NAME --path DIR` reads the folder's config and tokenizer (not its weights), checks that the
engine supports the model's family, and writes the model's card under NAME with the folder and dtype. From then on
the API lists NAME and validates jobs for it (they wait queued until a worker serves it), and `selfie worker
--model NAME` loads the weights from that folder in that dtype. The folder must be readable at the same path on
every worker's machine (a shared or identical mount). A hub id instead of a folder loads where the hub is
reachable (or the model is in the local hub cache); elsewhere the command fails and says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from selfie_cli.database import cli_session
from selfie_cli.errors import UserError

DTYPES = ["float32", "bfloat16", "float16"]


def resolve_source(path: str) -> str:
    """An absolute folder, or the hub id as given; a path that names no folder is refused."""
    from selfie_core.loading import is_hub_id

    folder = Path(os.path.expanduser(path))
    if folder.is_dir():
        return str(folder.resolve())
    if not is_hub_id(path) or path.count("/") > 1:  # hub ids are "name" or "org/name"
        raise click.BadParameter(f"no model folder at {path}", param_hint="--path")
    return path


@click.group()
def models() -> None:
    """The model catalogue: local Hugging Face folders served under a name."""


@models.command("add")
@click.argument("name")
@click.option("--path", "path", required=True, help="A Hugging Face model folder (or a hub id).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True,
              help="The dtype workers load the weights in.")
@click.option("--replace", is_flag=True,
              help="Replace NAME's existing entry (live workers keep serving the old one until they restart).")
def models_add(name: str, path: str, dtype: str, replace: bool) -> None:
    """Make the model at --path servable as NAME (selfie worker --model NAME)."""
    from selfie_core import UnsupportedArchitectureError
    from selfie_core.cardinfo import folder_card
    from selfie_core.loading import BUILTIN, ModelUnavailableError
    from selfie_jobs.cards import add_to_catalogue, check_model_name

    try:
        check_model_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from exc
    if name in BUILTIN:
        raise click.BadParameter(f"{name!r} is the built-in model's name; choose another", param_hint="NAME")
    source = resolve_source(path)
    serving = _check_replace(name, replace)  # before the folder is read, which takes a while
    try:
        card = folder_card(source, name, dtype)
    except (UnsupportedArchitectureError, ModelUnavailableError) as exc:
        raise UserError(str(exc)) from exc
    except (OSError, ValueError) as exc:  # a folder without config.json, an unreadable tokenizer ...
        raise UserError(f"cannot read a model at {source}: {str(exc).splitlines()[0]}") from exc
    with cli_session() as session:
        add_to_catalogue(session, name, card, path=source, dtype=dtype)
    click.echo(f"{name}: {card['architecture']} ({card['family']}), {card['num_layers']} layers, hidden size "
               f"{card['hidden_size']}, context {card['max_context']}, {dtype}, from {source}")
    if serving:
        click.echo(f"note: {name} is served now by {', '.join(serving)}, which keep serving the entry they loaded; "
                   "the replacement takes effect when its workers restart", err=True)


def _check_replace(name: str, replace: bool) -> list[str]:
    """The live workers serving NAME; an existing entry, or a name a live worker serves, needs --replace.

    A worker keeps the weights and dtype it loaded, so a silently replaced card (another dtype, another folder)
    would describe what none of its workers runs until they restart.
    """
    from selfie_jobs.cards import catalogue_entry
    from selfie_jobs.liveness import live_workers
    from selfie_jobs.settings import get_settings

    with cli_session() as session:
        entry = catalogue_entry(session, name)
        serving = [w.name for w in live_workers(session, get_settings().worker_alive_seconds, model=name)]
    if replace or (entry is None and not serving):
        return serving
    what = (f"{name!r} is already in the model catalogue ({entry.get('dtype')}, from {entry.get('path')})"
            if entry is not None else f"{name!r} is a model that a live worker serves")
    if serving:
        what += f"; served now by {', '.join(serving)}"
    raise UserError(what, "pass --replace to replace it (live workers keep the old one until they restart), or "
                          "choose another NAME")


@models.command("list")
def models_list() -> None:
    """Catalogued models: name, dtype, path."""
    from selfie_jobs.cards import catalogued_models

    with cli_session() as session:
        entries = catalogued_models(session)
    for name, entry in sorted(entries.items()):
        click.echo(f"{name}\t{entry.get('dtype')}\t{entry.get('path')}")


@models.command("remove")
@click.argument("name")
@click.option("--fail-jobs", is_flag=True, help="Fail the jobs still queued or running for NAME (otherwise their "
              "existence refuses the removal).")
def models_remove(name: str, fail_jobs: bool) -> None:
    """Take NAME out of the catalogue (its card goes with it; running workers are not stopped)."""
    from selfie_jobs.cards import CatalogueInUse, remove_from_catalogue, unfinished_jobs

    try:
        with cli_session() as session:
            failed = len(unfinished_jobs(session, name)) if fail_jobs else 0
            removed = remove_from_catalogue(session, name, fail_unfinished=fail_jobs)
    except CatalogueInUse as exc:
        raise UserError(f"{exc}: wait for them, cancel them, or pass --fail-jobs to fail them") from exc
    if not removed:
        raise UserError(f"{name!r} is not in the model catalogue")
    click.echo(f"removed {name}" + (f" and failed its {failed} unfinished job(s)" if failed else ""))
