"""What a run names, and how: the files it writes in OUT (results.jsonl, errors.jsonl, skipped.jsonl,
prompts/, its temporaries), a file name as the file system has it (`resolved`, `shown` with \\udcXX
escapes, `name_problem`: a name no file can have) and an OSError in words (`os_problem`)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
SKIPPED = "skipped.jsonl"  # the files a folder walk did not read, each with why
PROMPTS = "prompts"
PARTIAL = "results.partial.jsonl"  # where resume sets aside a half-written last line
OWN_FILES = (RESULTS, ERRORS, SKIPPED, PARTIAL)  # never inputs when OUT is (inside) a walked folder
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs, APFS)
TMP_PREFIX = ".cropper-"  # temporaries: .cropper-PID-N.part beside the file they become


def shown(text: str | os.PathLike[str]) -> str:
    """Text with a name's bytes that are not UTF-8 (held as surrogate escapes) written as \\udcXX,
    the escape JSON writes for them: for the report and prompt files."""
    return os.fspath(text).encode("utf-8", "backslashreplace").decode("utf-8")


def resolved(path: str | os.PathLike[str]) -> str:
    """The absolute path with links followed where they resolve; a loop of links or a name
    the file system refuses stays as given (made absolute), for the error to name it."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError):  # RuntimeError: "Symlink loop" (Python < 3.13)
        return os.path.abspath(path)


def name_problem(path: str) -> str | None:
    """Why `path` cannot name a file on this machine (a NUL character, a lone surrogate, a name
    over 255 bytes), or None."""
    if "\x00" in path:
        return "its name contains a NUL character (\\u0000), which no file name can hold; fix the name"
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        return ("its name contains a lone UTF-16 surrogate, which is no character (a \\udcXX escape stands "
                "for one byte of a name that is not UTF-8, 0x80 to 0xff); fix the name")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            return (f"a name of {len(part)} bytes; file names here have at most {NAME_MAX}, so no such file "
                    "can exist: check the name (a path pasted twice?)")
    return None


def os_problem(exc: OSError) -> str:
    """An OSError in words: disk full, file too large (with the limit), name too long, ..."""
    if exc.errno == errno.ENOSPC:
        return "disk full (no space left on the device)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno == errno.EFBIG:
        limit = "the file-size limit"
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if soft != resource.RLIM_INFINITY:
                limit = f"this process's file-size limit of {soft:,} bytes (ulimit -f {soft // 1024})"
        except (ImportError, OSError, ValueError):
            pass
        return f"file too large: over {limit}"
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return exc.strerror or str(exc)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
