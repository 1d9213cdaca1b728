"""The dependency rules of docs/architecture.md, checked on the source, and the no-pickle rule."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level modules it must never import
FORBIDDEN = {
    "selfie_core": {"celery", "sqlalchemy", "fastapi", "redis", "selfie_jobs", "workers", "api", "pydantic_settings"},
    "selfie_jobs": {"torch", "transformers", "selfie_core", "workers", "api", "fastapi"},
    "api": {"torch", "transformers", "selfie_core", "workers", "accelerate"},
    "selfie_client": {"torch", "selfie_core", "workers", "api", "sqlalchemy"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_dependency_rules(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no source files"
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & FORBIDDEN[package]) for path in files
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_pickle_outside_tests():
    hits = []
    for package in ("selfie_core", "selfie_jobs", "workers", "api", "selfie_cli", "selfie_client", "migrations"):
        for path in (ROOT / package).rglob("*.py"):
            if "pickle" in imported_modules(path) or "serializer='pickle'" in path.read_text().replace('"', "'"):
                hits.append(str(path.relative_to(ROOT)))
    assert not hits


def test_api_process_never_loads_torch():
    """Building the API app (as uvicorn does) must not pull torch in, even transitively."""
    code = (
        "import sys, os; os.environ['SELFIE_DATABASE_URL']='sqlite://'; "
        "from api.main import create_app; create_app(); "
        "bad = [m for m in ('torch', 'transformers', 'selfie_core', 'workers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module", ["selfie_core", "selfie_jobs.models", "workers.celery_app", "api.main", "selfie_cli.main"])
def test_import_has_no_side_effects(module, tmp_path):
    """Importing a module creates no database file, no model and no connection."""
    code = (
        "import os, sys; os.environ['SELFIE_DATA_DIR']=sys.argv[1]; "
        f"import {module}; "
        "created = os.listdir(sys.argv[1]); print(created); sys.exit(1 if created else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_routes_leave_domain_errors_to_the_registered_handlers():
    """Routes raise domain errors (`selfie_jobs.errors`) and never build an HTTP error themselves: `api/errors.py`
    maps each to its status once, for every route."""
    offenders = [
        str(path.relative_to(ROOT)) for path in sorted((ROOT / "api" / "routes").glob("*.py"))
        if "HTTPException" in path.read_text() or "except SubmissionError" in path.read_text()
    ]
    assert not offenders
