"""Writing whole, or not at all: a file (`atomic_write`: a temporary beside it, synced, renamed)
and a JSON-lines row (`JsonLines.append`: the file cut back on a failure). Every byte goes
through `_write` (a test stands in a full disk there)."""

from __future__ import annotations

import errno
import itertools
import json
import os
from pathlib import Path
from typing import Any

from cropper_engine.batch.names import TMP_PREFIX

_write = os.write  # every byte this module writes goes through here (a test stands in a full disk)
_tmp_counter = itertools.count(1)


def _write_all(fd: int, data: bytes) -> None:
    """All of `data`, or an OSError (a short write on a full disk is followed by ENOSPC)."""
    view = memoryview(data)
    while view:
        n = _write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def atomic_write(path: Path, data: bytes) -> None:
    """`data` at `path` whole or not at all: written to a temporary name in the same folder,
    synced, renamed over `path`. On any failure the temporary is removed and the error raised
    (with `path` as its filename)."""
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{next(_tmp_counter)}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            _write_all(fd, data)
            os.fsync(fd)  # a full network or delayed-allocation file system may say so only here
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = str(path)
        raise


class JsonLines:
    """An append-only JSON-lines file: each row written whole, or the file cut back to where it
    was (a full disk never leaves half a row). Rows are ASCII: a name's bytes that are not UTF-8
    are \\udcXX escapes."""

    def __init__(self, path: Path, *, truncate: bool = False) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(path, flags | (os.O_TRUNC if truncate else 0), 0o666)
        self.last = -1  # where the last row written starts

    def append(self, row: Any) -> None:
        data = (json.dumps(row) + "\n").encode("ascii")
        start = self.last = os.fstat(self.fd).st_size
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass
            exc.filename = exc.filename or str(self.path)
            raise

    def undo(self) -> None:
        """Take the last row back (what went with it could not be written)."""
        if self.last >= 0:
            os.ftruncate(self.fd, self.last)
            self.last = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
