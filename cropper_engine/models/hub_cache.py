"""The local Hugging Face hub cache: where it is and what it holds. The one lookup the registry,
the VLM loaders and the CLIP loaders share; it reads the cache's folders directly (no network,
no huggingface_hub import). Also the fingerprints the CLIP loaders name their weights by
(`file_sha256`, which takes a blob's name in the cache as its digest, `_canonical_json`,
`_fingerprint`).

Layout: `<cache>/models--<owner>--<name>/{refs/main, snapshots/<commit>/...}`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
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


# --- the CLIP loaders' names for these lookups, and the fingerprints of their weights ---------


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: `hub_cache_dir`, by the name the
    CLIP loaders (clip_openclip.py, clip_hf.py) use."""
    return hub_cache_dir()


def find_in_hf_cache(
    repo_id: str, filenames: Sequence[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path | None:
    """The first of `filenames` present in the local hub cache for `repo_id`, or None.

    Reads the cache layout directly (models--org--name/{refs,snapshots}): no network, no
    huggingface_hub import. The snapshot named by refs/main is preferred, then any other
    (`find_file`, by the name the CLIP loaders use).
    """
    return find_file(repo_id, tuple(filenames), cache_dir)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime).

    A file in the hub cache is a link to blobs/<sha256 of its bytes> (for LFS files): that name
    is the same digest, so it is taken without reading the file.
    """
    p = Path(path)
    real = p.resolve()
    name = real.name
    if real.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(real, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _canonical_json(path: Path, drop: Sequence[str] = ()) -> bytes:
    """A JSON file's content with keys sorted and volatile keys (versions, paths) left out."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in drop}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _fingerprint(parts: Sequence[bytes | str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


__all__ = ["CACHE_VARS", "cached_snapshot", "file_sha256", "find_file", "find_in_hf_cache", "hf_hub_cache_dir",
           "hub_cache_dir", "hub_id_of", "repo_folder", "snapshots"]
