"""Parts the README promises (vLLM, its server, Chromium for the page test): where one is missing
or broken, a test that needs it skips on a developer's machine but FAILS in CI (the `CI`
environment variable set, as CI services and `.ci/run` set it), so a broken install can never
give a green `make test` with those tests not run."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


MARKEXPR = ""  # the run's `-m` expression (conftest.py sets it when pytest starts)


def _module_deselected() -> bool:
    """A run of the vLLM tests only (`-m vllm`, in .venv-vllm, which has none of the other
    extras): a module's requirement at import does not matter, its other tests are deselected."""
    return MARKEXPR.strip() == "vllm"


def missing(reason: str, module_level: bool = False) -> NoReturn:
    """Skip (here) or fail (in CI) because a promised part is absent or broken."""
    if in_ci() and not (module_level and _module_deselected()):
        pytest.fail(f"{reason} [CI is set: a missing or broken part fails the run instead of skipping]",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def need_module(name: str, reason: str, module_level: bool = False) -> ModuleType:
    """`import name`, or `missing(...)`: a broken install (any exception on import) counts too."""
    try:
        return importlib.import_module(name)
    except Exception as e:
        missing(f"{reason}: `import {name}` failed ({type(e).__name__}: {e})", module_level)


def need_path(path: os.PathLike[str] | str, what: str) -> None:
    """`missing(...)` unless `path` exists: real data the tests read (../shared/data), which CI has."""
    from pathlib import Path

    if not Path(path).exists():
        missing(f"{what} not found at {path}")
