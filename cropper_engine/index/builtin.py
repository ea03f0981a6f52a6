"""The built-in example table shipped in the package: used when no --index is given.

It holds descriptors and normalised ground-truth crops of a public cropping dataset (no
images), built for one embedder; `builtin_index(embedder)` returns it when it matches the
embedder in use, else None. `python -m cropper_engine.index.builtin` rebuilds it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "builtin"


def table_dir(embedder_id: str) -> Path:
    return ASSETS / re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder_id)


def builtin_index(embedder: Any) -> Any | None:
    from cropper_engine.index.store import ExampleIndex

    d = table_dir(embedder.id)
    if not (d / "manifest.json").is_file():
        return None
    return ExampleIndex.load(d, embedder=embedder)
