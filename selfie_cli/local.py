"""`selfie interpret`: the engine in this process (no API or queue), with the service's index rules. The database
is only read for the model catalogue: a model added with `selfie models add` loads from its folder and dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def interpret_locally(
    prompt: str,
    *,
    model: str | None = None,
    model_path: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    batch_size: int | None = None,
    layers: str = "all",
    tokens: str = "all",
    pairs: Sequence[tuple[int, int]] | None = None,
    template: str | None = None,
    system: str | None = None,
    k: int = 1,
    injection_mode: str = "replace",
    injection_strength: float = 1.0,
    max_new_tokens: int = 30,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    grounding_threshold: float | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> Any:
    """Interpret `prompt` and return a DataFrame in the shape of the service's results (`selfie_core.to_dataframe`)."""
    from selfie_cli.database import catalogued_source
    from selfie_cli.render import progress_bar
    from selfie_client.client import selector
    from selfie_jobs.settings import get_settings
    from selfie_jobs.specs import Targets, resolve_index, resolve_selector

    # torch and the engine load only here, when the command runs
    from selfie_core import (
        GenerationConfig,
        InjectionConfig,
        InterpretRequest,
        SelfieEngine,
        load_model,
        to_dataframe,
    )

    from selfie_core.threads import set_threads

    set_threads(threads)  # before the model loads
    settings = get_settings()
    name = model or settings.default_model
    source, dtype = catalogued_source(name, model_path=model_path, dtype=dtype)
    loaded = load_model(source or name, device=device, dtype=dtype,
                        cache_dir=None if source else str(settings.resolved_model_cache_dir() / name))
    engine = SelfieEngine(loaded, name=name)
    n_tokens = len(engine.tokenizer(prompt).input_ids)
    n_layers = engine.num_layers + 1
    if pairs:
        wanted = [(resolve_index(layer, n_layers, "layer"), resolve_index(token, n_tokens, "token"))
                  for layer, token in pairs]
    else:
        targets = Targets.model_validate({"layers": selector(layers), "tokens": selector(tokens)})
        wanted = [(layer, token) for layer in resolve_selector(targets.layers, n_layers, "layer")
                  for token in resolve_selector(targets.tokens, n_tokens, "token")]
    wanted = list(dict.fromkeys(wanted))
    requests = [InterpretRequest(prompt=prompt, layer=layer, token=token, key=(layer, token)) for layer, token in wanted]
    injection = InjectionConfig(k=k, mode=injection_mode, strength=injection_strength)
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, seed=seed)
    results = []
    with progress_bar("interpreting", len(requests), enabled=progress) as update:
        preset = {"preset": template or "summarize", "system": system}
        grounding = None if grounding_threshold is None else {"min_mean_relevancy": grounding_threshold}
        for batch in engine.stream(requests, preset, injection, generation, batch_size, grounding):
            results.extend(batch)
            update(advance=len(batch))
    return to_dataframe(results).drop(columns=["key"])
