"""`selfie generate PROMPT...`: a `generate` job on the service (each prompt in the model's chat format, or raw),
waited for, its generations printed in prompt order (or as JSON rows, or only submitted with --no-wait)."""

from __future__ import annotations

import json

import click

from selfie_cli.errors import UserError

URL_OPTION = click.option("--url", envvar="SELFIE_URL", default="http://127.0.0.1:8000", show_default=True,
                          help="The API's base URL (env SELFIE_URL).")
KEY_OPTION = click.option("--api-key", envvar="SELFIE_API_KEY", default=None,
                          help="Bearer API key (env SELFIE_API_KEY); not needed with `selfie up`.")


@click.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--model", default=None, help="Served model name (default: the service's default model).")
@click.option("--chat/--raw", default=True, show_default=True,
              help="Each prompt as one user turn in the model's chat template (--chat), or its raw text (--raw).")
@click.option("--system", default=None, help="A system prompt (chat format only; default: none).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--sample/--greedy", "do_sample", default=False, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Makes a sample repeatable.")
@click.option("--priority", type=click.IntRange(0, 9), default=5, show_default=True, help="9 = most urgent.")
@click.option("--idempotency-key", default=None)
@click.option("--variant", default=None, help="Generate on a model variant (an edit's; `selfie variants`).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows (prompt_index, text, finish, token_ids) as JSON.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait and print the generations (--no-wait: print the job's id and link).")
@URL_OPTION
@KEY_OPTION
def generate(prompts, model, chat, system, max_new_tokens, do_sample, temperature, top_p, seed, priority,
             idempotency_key, variant, as_json, wait, url, api_key) -> None:
    """Generate the model's answer to each of PROMPTS (greedy by default) and print them in order."""
    from selfie_client import Client

    ctx = click.get_current_context()
    if not do_sample:  # sampling options without --sample would be silently ignored by greedy decoding
        given = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_p", "seed")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --sample (greedy decoding has no randomness)")

    with Client(url, api_key) as client:
        accepted = client.submit_generate(list(prompts), model=model, chat=chat, system=system,
                                          max_new_tokens=max_new_tokens, do_sample=do_sample,
                                          temperature=temperature, top_p=top_p, seed=seed, priority=priority,
                                          idempotency_key=idempotency_key, variant=variant)
        if not wait:
            click.echo(f"job {accepted['id']}: {accepted['total']} generations in {accepted['chunks']} chunks")
            click.echo(f"status:  {accepted['link']}")
            return
        status = client.wait(accepted["id"], progress=not as_json)
        if status["state"] != "succeeded":
            raise UserError(f"job {accepted['id']} {status['state']}: {status.get('error') or 'no reason given'}")
        rows = sorted(client.iter_rows(accepted["id"]), key=lambda row: row["prompt_index"])
    if as_json:
        keep = ("prompt_index", "text", "finish", "token_ids")
        click.echo(json.dumps([{k: row[k] for k in keep} for row in rows], ensure_ascii=False))
        return
    for row in rows:
        prompt = prompts[row["prompt_index"]]
        ended = "" if row["finish"] == "eos" else "  [max_new_tokens reached]"
        text = row["text"] if row["text"].strip() else "(empty: the model ended its answer at once)"
        click.echo(f"prompt {row['prompt_index']}: {prompt}")
        click.echo(f"{text}{ended}\n")
