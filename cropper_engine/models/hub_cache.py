"""The local Hugging Face hub cache: where it is and what it holds. The one lookup the registry,
the VLM loaders and the CLIP loaders share; it reads the cache's folders directly (no network,
no huggingface_hub import).

Layout: `<cache>/models--<owner>--<name>/{refs/main, snapshots/<commit>/...}`.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")  # the second is the older name; both are honoured


def hub_cache_dir() -> Path:
    """The hub cache folder, from the environment as it is now (not as it was at import time):
    HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub."""
    env = os.environ
    for var in CACHE_VARS:
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def repo_folder(hub_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    return root / ("models--" + hub_id.strip("/").replace("/", "--"))


def snapshots(hub_id: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
              ) -> list[Path]:
    """The repo's snapshot folders, best first: the pinned `revision`, the one `main` points to,
    then the others, newest first."""
    repo = repo_folder(hub_id, cache_dir)
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return []
    first: list[Path] = []
    if revision:
        first.append(snaps / revision)
    ref = repo / "refs" / "main"
    if ref.is_file():
        first.append(snaps / ref.read_text().strip())
    others = sorted((p for p in snaps.iterdir() if p.is_dir() and p not in first),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in dict.fromkeys([*first, *others]) if p.is_dir()]


def cached_snapshot(hub_id: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
                    ) -> Path | None:
    """The best snapshot folder of a hub repo that holds its config.json, or None."""
    return next((s for s in snapshots(hub_id, revision, cache_dir) if (s / "config.json").is_file()), None)


def find_file(hub_id: str, filenames: list[str] | tuple[str, ...],
              cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The first of `filenames` present in the repo's best snapshot that has one (a dangling
    link into blobs/ is not a file)."""
    for snap in snapshots(hub_id, None, cache_dir):
        for name in filenames:
            if (snap / name).is_file():
                return snap / name
    return None


def hub_id_of(folder: str | os.PathLike[str]) -> str | None:
    """The hub id `owner/name` of a snapshot folder (`.../models--owner--name/snapshots/<rev>`),
    None for any other folder."""
    p = Path(folder).expanduser()
    try:
        p = p.resolve()
    except OSError:
        pass
    if p.parent.name != "snapshots":
        return None
    name = p.parent.parent.name
    if not name.startswith("models--") or name.count("--") < 2:
        return None
    owner, _, rest = name[len("models--"):].partition("--")
    return f"{owner}/{rest}"


__all__ = ["CACHE_VARS", "cached_snapshot", "find_file", "hub_cache_dir", "hub_id_of", "repo_folder", "snapshots"]
