"""`selfie variants`: the model variants edit jobs made, over the HTTP API (list, show, delete). A job runs on one
with `selfie submit ... --variant ID`."""

from __future__ import annotations

import json
from typing import Any

import click

URL_OPTION = click.option("--url", envvar="SELFIE_URL", default="http://127.0.0.1:8000", show_default=True,
                          help="The API's base URL (env SELFIE_URL).")
KEY_OPTION = click.option("--api-key", envvar="SELFIE_API_KEY", default=None,
                          help="Bearer API key (env SELFIE_API_KEY).")


def _client(url: str, api_key: str | None):
    from selfie_client import Client

    return Client(url, api_key)


def variants_table(rows: list[dict[str, Any]]):
    """The variants as a rich Table: id, base model, method, layer, created (UTC), edit job."""
    from rich.table import Table

    table = Table(header_style="bold", show_lines=False)
    for name in ("id", "model", "method", "layer", "created (UTC)", "job"):
        table.add_column(name, justify="right" if name == "layer" else "left", no_wrap=True)
    for v in rows:
        table.add_row(v["id"], v["model"], v["method"], str(v["layer"]),
                      str(v.get("created_at") or "")[:19].replace("T", " "), v["job_id"])
    return table


def _last_losses(losses: list[dict[str, Any]]) -> str:
    if not losses:
        return "(none)"
    first, last = losses[0], losses[-1]
    parts = [f"{len(losses)} epochs"]
    for name in ("loss", "edit_loss", "keep_loss", "bad_share"):
        if first.get(name) is not None or last.get(name) is not None:
            parts.append(f"{name} {first.get(name)} -> {last.get(name)}")
    return "; ".join(parts)


@click.group(invoke_without_command=True)
@URL_OPTION
@KEY_OPTION
@click.pass_context
def variants(ctx: click.Context, url: str, api_key: str | None) -> None:
    """Model variants (edit jobs' results): `selfie variants` lists yours, newest first; `show ID`, `delete ID`."""
    if ctx.invoked_subcommand is not None:
        return
    from selfie_cli.render import console

    with _client(url, api_key) as client:
        rows = client.variants()
    out = console()
    if not rows:
        out.print("(no variants)")
        return
    out.print(variants_table(rows))


@variants.command("show")
@click.argument("variant_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print everything the service holds about it as JSON.")
@URL_OPTION
@KEY_OPTION
def show(variant_id: str, as_json: bool, url: str, api_key: str | None) -> None:
    """A variant: base model, layer, method, sha256, the edit's settings, losses and evaluations."""
    from selfie_cli.render import evaluation_lines

    with _client(url, api_key) as client:
        v = client.variant(variant_id)
    if as_json:
        click.echo(json.dumps(v, indent=2))
        return
    click.echo(f"variant {v['id']}: {v['method']} edit of {v['model']}, layer {v['layer']} "
               f"(the MLP of block {v['layer'] - 1})")
    click.echo(f"created: {v.get('created_at')}  job: {v['job_id']}")
    click.echo(f"page:    {v['page']}")
    click.echo(f"sha256:  {v['sha256']}")
    click.echo(f"settings: {json.dumps(v.get('settings') or {}, sort_keys=True)}")
    click.echo(f"losses:  {_last_losses(v.get('losses') or [])}")
    for line in evaluation_lines(v.get("evaluations") or {}):
        click.echo(line)


@variants.command("delete")
@click.argument("variant_id", metavar="ID")
@URL_OPTION
@KEY_OPTION
def delete(variant_id: str, url: str, api_key: str | None) -> None:
    """Delete a variant and its weights file; jobs still queued that name it fail."""
    with _client(url, api_key) as client:
        client.delete_variant(variant_id)
    click.echo(f"variant {variant_id} deleted")
