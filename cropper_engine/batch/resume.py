"""Taking up an earlier run (--resume): its torn last row repaired (`repair_results`), what its
results.jsonl holds (`load_done`, `load_outputs`), the temporaries of killed runs removed and
the crops left without a row found (`scan_crops`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cropper_engine.batch.names import PARTIAL, TMP_PREFIX, resolved


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def scan_crops(crops: Path, named: set[str] | None) -> set[str]:
    """Tidy OUT/crops/ before a run: remove the temporaries (.cropper-PID-N.part) of runs that were
    killed mid-write (not those of a live process). With `named` (the crops results.jsonl names,
    on --resume), return the other crop files there: the orphans of an interrupted run (a crop
    written, its row not), whose image takes the same name again instead of a `-1` copy."""
    orphans: set[str] = set()
    if not crops.is_dir():
        return orphans
    for dirpath, _dirs, files in os.walk(crops):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.startswith(TMP_PREFIX):
                pid = f[len(TMP_PREFIX):].split("-", 1)[0]
                if f.endswith(".part") and pid.isdigit() and not pid_alive(int(pid)):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                continue
            if named is not None and not f.startswith("."):
                key = resolved(path)
                if key not in named:
                    orphans.add(key)
    return orphans


def repair_results(results_path: Path) -> str | None:
    """Before resuming: a results.jsonl whose last line was cut short (a run killed mid-write) is
    cut back to its last whole line, the partial text set aside in results.partial.jsonl (its
    image is then cropped again); a whole last row missing only its newline gets it. Returns a
    note saying what was done, or None."""
    try:
        size = results_path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with results_path.open("rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return None
        pos, block = size, 1 << 16
        start = 0
        while pos > 0:  # find the last newline, reading backwards
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step)
            k = chunk.rfind(b"\n")
            if k >= 0:
                start = pos + k + 1
                break
        fh.seek(start)
        tail = fh.read()
        try:
            whole = isinstance(json.loads(tail.decode("utf-8", "surrogateescape")), dict)
        except ValueError:
            whole = False
        if whole:
            fh.seek(size)
            fh.write(b"\n")
            return f"{results_path}: its last row had no newline; added it"
        fh.truncate(start)
    aside = results_path.with_name(PARTIAL)
    with aside.open("ab") as fh:
        fh.write(tail + b"\n")
    return (f"{results_path}: its last line was cut short ({len(tail)} bytes, a run stopped mid-write); "
            f"set aside in {aside}, its image is cropped again")


def load_done(results_path: Path) -> set[tuple[str, str | None]]:
    """(image path, ratio) pairs already in a results.jsonl (a torn last line is ignored)."""
    done: set[tuple[str, str | None]] = set()
    for d in _rows(results_path):
        try:
            done.add((resolved(d["image"]), d.get("ratio")))
        except (KeyError, TypeError):
            continue
    return done


def load_outputs(results_path: Path) -> set[str]:
    """The crops a results.jsonl already names (resolved paths): no other image may take them."""
    return {resolved(d["output"]) for d in _rows(results_path) if isinstance(d.get("output"), str)}


def _rows(results_path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a results.jsonl; bytes that are not UTF-8 (a name written raw by another
    tool) are read as the surrogate escapes of those bytes, as the file system's names are."""
    if not results_path.exists():
        return
    with results_path.open(encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict):
                yield d
