"""Models written by `cropper-engine fit`: loading one, and the list `models list` shows.

A fitted model is a folder:

    model.json              as the shipped model's (models/default_model.py), plus "kind": "fitted",
                            what it was fitted on and its cross-validated report against the shipped model
    ratio.npz, free.npz     the trees, run with numpy
    table/                  its retrieval table: classical descriptors and crops of the training
                            images (manifest.json, vectors.f16.npy, metadata.jsonl; no images)

`--default-model DIR` (or `default_model = "DIR"` in the config, or CROPPER_DEFAULT_MODEL) makes
the no-VLM default (and the VLM loop's fallback) rank with it and retrieve from its table.
Each fit also appends its folder to a list in the user's data folder
($XDG_DATA_HOME/cropper-engine/fitted-models.txt), which `models list` reads.
"""

from __future__ import annotations

import json
import os
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from cropper_engine.errors import ModelNotFoundError

TABLE = "table"
LIST_FILE = "fitted-models.txt"


def _check_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelNotFoundError(f"--default-model {path}: no such folder; fit one with: cropper-engine fit "
                                 "--dataset jsonl --annotations crops.jsonl --out MODEL_DIR")
    if not (p / "model.json").is_file():
        raise ModelNotFoundError(f"--default-model {path}: not a fitted model (no model.json in it); "
                                 "it must be a folder written by `cropper-engine fit --out`")
    return p.resolve()


@lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> Any:
    from cropper_engine.index.builtin import _load as load_table_dir
    from cropper_engine.models.default_model import read_model

    p = Path(path)
    try:
        model = read_model(p)
    except ModelNotFoundError as exc:  # features of another version, a damaged .npz: say how to refit this one
        raise ModelNotFoundError(str(exc).split("; refit it")[0].replace("the model in", "the fitted model in")
                                 + "; fit it again with `cropper-engine fit` (its command is in model.json)") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelNotFoundError(f"the fitted model in {p} cannot be read ({type(exc).__name__}: {exc}); "
                                 "fit it again with `cropper-engine fit`") from None
    if (p / TABLE / "manifest.json").is_file():
        model.table = load_table_dir(str(p / TABLE))
    model.meta.setdefault("label", f"fitted model {p}")
    return model


def load_fitted(path: str | os.PathLike[str]) -> Any:
    """The DefaultModel in a folder written by `cropper-engine fit` (loaded once per process and
    change), with its retrieval table as `.table`. Raises ModelNotFoundError naming the fix."""
    p = _check_dir(path)
    return _load(str(p), (p / "model.json").stat().st_mtime)


def list_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cropper-engine" / LIST_FILE


def remember(path: str | os.PathLike[str]) -> None:
    """Add a fitted model's folder to the list `models list` shows (best effort: a read-only home
    only loses the listing, never the model)."""
    p = str(Path(path).resolve())
    f = list_path()
    try:
        # a folder name that is not UTF-8 is written and read back as its bytes (surrogateescape)
        known = f.read_text(encoding="utf-8", errors="surrogateescape").splitlines() if f.is_file() else []
        if p not in known:
            f.parent.mkdir(parents=True, exist_ok=True)
            with f.open("a", encoding="utf-8", errors="surrogateescape") as fh:
                fh.write(p + "\n")
    except OSError:
        pass


def describe_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One row of `models list`: where, what it was fitted on, and its CV figures (or why not)."""
    p = Path(path)
    row: dict[str, Any] = {"path": str(p), "present": (p / "model.json").is_file()}
    if not row["present"]:
        return row
    try:
        meta = json.loads((p / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        row["error"] = f"unreadable model.json ({exc})"
        return row
    on = meta.get("trained_on", {})
    row.update(dataset=on.get("dataset"), images=on.get("images"), created=meta.get("created"),
               features_version=meta.get("features_version"))
    row["cv"] = {t: {k: v.get(k) for k in ("iou", "disp", "shipped_iou", "shipped_disp")}
                 for t, v in (meta.get("cv") or {}).items() if isinstance(v, dict)}
    return row


def known_models(extra: list[str] | None = None) -> list[dict[str, Any]]:
    """The fitted models this user made (the list file), and any `extra` folders, once each."""
    paths: list[str] = []
    f = list_path()
    if f.is_file():
        paths += [line.strip() for line in f.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
                  if line.strip()]
    for e in extra or []:
        if e:
            paths.append(str(Path(e).expanduser().resolve()))
    seen: dict[str, None] = dict.fromkeys(paths)
    return [describe_dir(p) for p in seen]


__all__ = ["describe_dir", "known_models", "list_path", "load_fitted", "remember"]
