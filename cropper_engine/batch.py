"""Offline batch cropping: stream inputs, crop in batches, write crops + results.jsonl, resume.

Inputs are image files, directories (walked lazily, one directory listing at a time, symbolic
links to folders followed, each folder once) and manifests (.txt: one path per line; .jsonl:
{"image", "ratio"?, "mask"?, "subject"?, "task"?}, where "subject" is a `--subject` spec: auto,
face, person, saliency, "X,Y", "X1,Y1,X2,Y2" or a mask path). Nothing holds more than one batch
of decoded images. Outputs never overwrite an input or an existing file and never collide, across
resumed runs too; `resume` skips what results.jsonl already holds.

What a folder walk does not read (hidden files, files of a type Pillow cannot decode here, a
second link to a folder already walked) is named with the reason in OUT/skipped.jsonl and the
summary. A crop and its results.jsonl row exist only once whole: the crop is encoded in memory,
written to a temporary name beside it, synced and renamed; the row is appended whole or cut back.
A full disk stops the run cleanly (the rest is done by `--resume`); a crop over the file-size
limit (`ulimit -f`) is an error for that image only.

File names are kept as the file system has them: a name that is not UTF-8 is held with Python's
surrogateescape (in paths and messages alike) and written everywhere as \\udcXX, one escape per
byte that is not UTF-8: by JSON's own escape in results.jsonl, errors.jsonl and skipped.jsonl
(read back as the same name by --resume and `fit --dataset results`), on the terminal (the CLI
prints with errors="backslashreplace") and in the report and prompt files (`shown`).
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from cropper_engine.errors import CropperError, ImageError, InputError
from cropper_engine.imageio import AVIF_SUFFIXES, HEIF_SUFFIXES, NO_AVIF, NO_HEIC, is_image_path, with_image_notes
from cropper_engine.types import CropRequest, CropResult, Ratio, Task, parse_ratios

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


@dataclass
class InputItem:
    path: str
    rel: str  # path relative to its input root, for output naming
    ratios: list[Ratio] | None = None
    mask: str | None = None
    task: Task | None = None
    subject: str | None = None


# --- what a folder walk reads -------------------------------------------------------------------

CODECS = {"JPEG2000": "jpg_2000", "AVIF": "avif", "WEBP": "webp"}  # formats whose decoder is a build option


def walk_suffixes() -> set[str]:
    """The file extensions a folder walk takes: every one Pillow (or a plugin registered with it,
    such as pillow-heif's) can open and decode here. Asked at each walk: a plugin registered
    later counts."""
    from PIL import Image, ImageFile, features

    Image.init()
    ok = set()
    for ext, fmt in Image.registered_extensions().items():
        entry = Image.OPEN.get(fmt)
        if entry is None:
            continue
        factory = entry[0]
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile) \
                and getattr(sys.modules.get(factory.__module__), "_handler", None) is None:
            continue  # identified, not decoded (BUFR, GRIB, HDF5, WMF without a handler)
        try:
            if fmt in CODECS and not features.check(CODECS[fmt]):
                continue  # a Pillow built without this decoder
        except ValueError:
            pass
        ok.add(ext.lower())
    if ".jpg" in ok:
        ok.add(".mpo")  # JPEG's plugin opens MPO (multi-picture JPEG) files
    return ok


def unread_reason(name: str, suffixes: set[str]) -> str | None:
    """Why a folder walk does not read the file `name` (None: it does)."""
    suffix = PurePath(name).suffix.lower()
    if suffix in suffixes:
        return None
    if suffix in HEIF_SUFFIXES:
        return NO_HEIC
    if suffix in AVIF_SUFFIXES:
        return NO_AVIF
    if suffix in (".j2k", ".jp2", ".jpx", ".j2c", ".jpc", ".jpf"):
        return "no JPEG 2000 decoder in this Pillow (it is built without OpenJPEG)"
    if not suffix:
        return "no file extension, so not taken as an image (name it alone to crop it anyway)"
    return f"not an image type Pillow decodes here ({suffix}; name it alone to try it anyway)"


def iter_inputs(sources: Sequence[str], on_error: Callable[[str], None],
                skip_dir: str | os.PathLike[str] | None = None,
                on_skip: Callable[[str, str], None] | None = None) -> Iterator[InputItem]:
    """Images from files, directories (recursive, sorted per directory) and manifests; a walk
    never enters `skip_dir` (the output folder, which may sit inside an input folder) nor what
    this tool writes there (crops/, report/, prompts/, its .jsonl files), even when `skip_dir`
    is the walked folder itself. `on_skip(path, why)` hears of every file a walk does not read."""
    skip: frozenset[Path] = frozenset()
    if skip_dir:
        out = Path(resolved(skip_dir))
        skip = frozenset({out, out / "crops", out / "report", out / PROMPTS, *(out / f for f in OWN_FILES)})
    seen: set[tuple[int, int]] = set()  # the folders walked (device, inode): each once, loops cut
    suffixes: set[str] | None = None
    for src in sources:
        problem = name_problem(src)
        if problem:
            on_error(f"{src}: {problem}")
            continue
        p = Path(src)
        if _link_loop(p):
            on_error(f"{src}: a loop of symbolic links (it points back to itself); fix or remove the link")
            continue
        try:
            is_dir = p.is_dir()
            is_manifest = p.suffix.lower() in (".txt", ".jsonl") and p.is_file()
            exists = p.exists()
        except OSError as exc:
            on_error(f"{src}: cannot read it ({os_problem(exc)})")
            continue
        if is_dir:
            if suffixes is None:
                suffixes = walk_suffixes()
            key = _dir_key(p)
            if key is not None and key in seen:
                if on_skip:
                    on_skip(src, "a folder this run reads already (named twice, or inside a folder named "
                                 "before): not read again")
                continue
            if key is not None:
                seen.add(key)
            yield from _walk(p, p, skip, suffixes, seen, on_skip or (lambda _p, _w: None))
        elif is_manifest:
            yield from _manifest(p, on_error)
        elif exists or is_image_path(p):
            yield InputItem(str(p), p.name)
        else:
            on_error(f"{src}: no such file or directory")


def _dir_key(p: str | os.PathLike[str]) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(root: Path, d: Path, skip: frozenset[Path], suffixes: set[str], seen: set[tuple[int, int]],
          on_skip: Callable[[str, str], None]) -> Iterator[InputItem]:
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError as exc:
        on_skip(str(d), f"cannot list this folder ({os_problem(exc)})")
        return
    for e in entries:
        is_dir = _is_dir(e)
        if skip and (is_dir or e.name in OWN_FILES) and Path(resolved(e.path)) in skip:
            continue  # this tool's own output
        if e.name.startswith("."):
            if not e.name.startswith(TMP_PREFIX):
                on_skip(e.path, "a hidden folder (its name starts with '.'), not walked" if is_dir
                        else "a hidden file (its name starts with '.')")
            continue
        if is_dir:
            key = _dir_key(e.path)
            if key is not None and key in seen:
                link = f" (a link to {resolved(e.path)})" if e.is_symlink() else ""
                on_skip(e.path, f"a folder this run reads already{link}: a loop of links, or the same folder "
                                "reached twice; not read again")
                continue
            if key is not None:
                seen.add(key)
            yield from _walk(root, Path(e.path), skip, suffixes, seen, on_skip)
            continue
        why = unread_reason(e.name, suffixes)
        if why:
            on_skip(e.path, why)
        else:
            yield InputItem(e.path, os.path.relpath(e.path, root))


def _is_dir(e: os.DirEntry[str]) -> bool:
    """A folder, or a symbolic link to one (followed: the walk guards against loops)."""
    try:
        return e.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _link_loop(p: Path) -> bool:
    """A symbolic link that never reaches a file (it points, maybe through others, to itself)."""
    try:
        if not p.is_symlink():
            return False
        os.stat(p)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def out_rel(name: str) -> str:
    """Where a manifest line's image goes under crops/: its relative folders (sub/x.jpg) when they
    stay below crops/, else its base name only (../x.jpg, /abs/x.jpg): nothing is written outside --out."""
    p = PurePath(name)
    if p.is_absolute() or ".." in p.parts or not p.name:
        return p.name or "image"
    return str(p)


def _manifest(p: Path, on_error: Callable[[str], None]) -> Iterator[InputItem]:
    base = p.parent
    jsonl = p.suffix.lower() == ".jsonl"
    try:
        fh = p.open("rb")
    except OSError as exc:
        on_error(f"{p}: cannot read the manifest ({os_problem(exc)})")
        return
    with fh:
        for n, raw in enumerate(fh, 1):
            where = f"{p}:{n}"
            try:
                line = raw.decode("utf-8")
                utf8 = True
            except UnicodeDecodeError as exc:
                if jsonl:
                    on_error(f"{where}: bad manifest line (not UTF-8 text: byte 0x{raw[exc.start]:02x} at column "
                             f"{exc.start + 1}); a .jsonl manifest is UTF-8: save it as UTF-8, or write a name's "
                             "bytes that are not UTF-8 as \\udcXX escapes")
                    continue
                line, utf8 = os.fsdecode(raw), False  # a .txt line is a file name: its bytes as they are
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not jsonl:
                problem = name_problem(line)
                path = line if os.path.isabs(line) else str(base / line)
                if problem is None and not utf8 and not os.path.lexists(path):
                    problem = ("no such file; this line is not UTF-8 text (a list saved in another encoding, "
                               "such as Latin-1?): save the list as UTF-8")
                if problem:
                    on_error(f"{where}: {line}: {problem}")
                    continue
                yield InputItem(path, out_rel(line))
                continue
            try:
                d = json.loads(line)
                img = str(d["image"])
                # a line's own ratio, read as everywhere (types.parse_ratios): "", [] or 0 is refused
                ratios = parse_ratios(d["ratio"], '"ratio"') if d.get("ratio") is not None else None
                task = Task.parse(d["task"]) if d.get("task") else None
                mask = d.get("mask")
                for what, value in (("image", img), ("mask", mask)):
                    problem = name_problem(value) if isinstance(value, str) else None
                    if problem:
                        raise InputError(f'"{what}" {json.dumps(value)}: {problem}')
                if mask and not os.path.isabs(mask):
                    mask = str(base / mask)
                subject = d.get("subject")
                if subject is not None:
                    from cropper_engine.engine.subject import SubjectSpec

                    spec = SubjectSpec.parse(subject)
                    if spec.kind == "mask" and name_problem(spec.path):
                        raise InputError(f'"subject" {json.dumps(subject)}: {name_problem(spec.path)}')
                    subject = str(base / spec.path) if spec.kind == "mask" and not os.path.isabs(spec.path) \
                        else subject
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, InputError) as exc:
                on_error(f"{where}: bad manifest line ({exc})")
                continue
            path = img if os.path.isabs(img) else str(base / img)
            yield InputItem(path, out_rel(img), ratios, mask, task, subject)


def count_inputs(sources: Sequence[str], skip_dir: str | None = None) -> int | None:
    """A quick count for the progress bar (names only)."""
    n = 0
    for item in iter_inputs(sources, lambda _m: None, skip_dir):
        del item
        n += 1
    return n


# --- writing: whole files and whole rows, or nothing -------------------------------------------

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


def ratio_tag(r: Ratio | None) -> str:
    return "" if r is None else "_" + str(r).replace(":", "x").replace(".", "p")


def fit_name(stem: str, rest: str) -> str:
    """stem + rest, the stem cut (at a character boundary, marked ~) to keep the name within
    NAME_MAX bytes: a long input name never makes its crop's name impossible."""
    name = stem + rest
    if len(os.fsencode(name)) <= NAME_MAX:
        return name
    raw = os.fsencode(stem)[: max(1, NAME_MAX - len(os.fsencode(rest)) - 1)]
    for drop in range(4):  # not inside a UTF-8 sequence
        try:
            return raw[: len(raw) - drop].decode("utf-8") + "~" + rest
        except UnicodeDecodeError:
            continue
    return os.fsdecode(raw) + "~" + rest


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(resolved(path)).relative_to(resolved(folder))
    except ValueError:
        return False
    return True


CROP_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
# JPEG by other names, and photos in HEIC / AVIF: crops are .jpg (HEIC / AVIF with --format); others .png
CROP_SUFFIX = {".jfif": ".jpg", ".jpe": ".jpg", ".mpo": ".jpg", **dict.fromkeys(HEIF_SUFFIXES + AVIF_SUFFIXES, ".jpg")}
# --format: the crops' format whatever the input's (auto: the input's where it is one of CROP_FORMATS)
OUT_FORMATS = {"jpg": ".jpg", "png": ".png", "webp": ".webp", "tif": ".tif", "heic": ".heic", "avif": ".avif"}
WRITERS = {**CROP_FORMATS, ".heic": "HEIF", ".avif": "AVIF"}


def check_out_format(fmt: str | None) -> None:
    """Refuse --format heic / avif before any work where no encoder for it is installed here."""
    from PIL import Image, features

    from cropper_engine.imageio import heif_plugin

    if fmt == "heic" and (heif_plugin() is None or Image.SAVE.get("HEIF") is None):
        raise InputError("--format heic needs a HEIC encoder: pip install pillow-heif (or write JPEG: --format jpg)")
    if fmt == "avif":
        try:
            ok = bool(features.check("avif"))
        except (ValueError, ImportError):
            ok = False
        if not ok:
            raise InputError("--format avif needs a Pillow with AVIF (pip install -U pillow; 11.3 or later)")


@dataclass
class OutputWriter:
    out_dir: Path
    size: tuple[int, int] | None = None
    inputs: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)
    quality: int = 95
    orphans: set[str] = field(default_factory=set)  # crops an interrupted run left without their row
    fmt: str | None = None  # --format: jpg | png | webp | tif | heic | avif; None: as the input (HEIC, AVIF: jpg)

    def path_for(self, item: InputItem, ratio: Ratio | None) -> Path:
        """OUT/crops/<the input's relative name>[_WxH][-k].<ext>: always inside OUT/crops/, never an
        input, an existing file or a name this run gave (an orphan of an interrupted run is reused)."""
        crops = self.out_dir / "crops"
        rel = PurePath(out_rel(item.rel))
        ext = rel.suffix.lower()
        suffix = OUT_FORMATS[self.fmt] if self.fmt else ext if ext in CROP_FORMATS else CROP_SUFFIX.get(ext, ".png")
        folder = crops / rel.parent
        if not _inside(folder, crops):  # a link inside crops/ leading out of it
            folder = crops
        tag = ratio_tag(ratio)
        for k in itertools.count():
            cand = folder / fit_name(rel.stem if rel.suffix else rel.name, f"{tag}{f'-{k}' if k else ''}{suffix}")
            key = str(cand.resolve())
            if key in self.orphans:
                self.orphans.discard(key)
                break
            if key not in self.used and key not in self.inputs and not os.path.lexists(cand):
                break
        self.used.add(key)
        return cand

    def write(self, item: InputItem, result: CropResult, image: Any, icc: bytes | None) -> Path:
        """The crop, encoded in memory, then written whole (atomic_write). `image`: the whole image
        at full resolution (`LoadedImage.image`, decoded once for all of an image's crops). Raises
        OSError naming the crop's path (its name is given back for a later try)."""
        from PIL import Image

        crop = image.crop(tuple(result.box.as_int()))
        if self.size:
            w, h = self.size
            if crop.width > w or crop.height > h:  # never upscale
                crop.thumbnail((w, h), Image.Resampling.LANCZOS)
        out = self.path_for(item, result.ratio)
        kw: dict[str, Any] = {}
        if icc:
            kw["icc_profile"] = icc
        ext = out.suffix.lower()
        if ext in (".jpg", ".jpeg"):
            kw.update(quality=self.quality, subsampling=0)
        elif ext in (".heic", ".avif"):
            kw.update(quality=self.quality)
        try:
            buf = io.BytesIO()
            crop.save(buf, format=WRITERS[ext], **kw)
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, buf.getvalue())
        except BaseException as exc:
            self.used.discard(str(out.resolve()))
            if isinstance(exc, OSError):
                exc.filename = str(out)
            raise
        return out


def _probe(folder: Path) -> None:
    """Create `folder` (and its parents) if missing and write a file there; raises OSError."""
    probe = folder / f"{TMP_PREFIX}write-test-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(probe, "w") as fh:
        fh.write("ok\n")
    probe.unlink()


def check_out_dir(out_dir: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse an output folder that cannot be written (read-only, /proc, a file), before any work."""
    text = os.fspath(out_dir)
    if not text.strip():
        raise InputError(f"{option} '' names no folder: give one (it is created if missing)")
    problem = name_problem(text)
    if problem:
        raise InputError(f"{option} {text}: {problem}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {text} is a file, not a folder; choose a folder (it is created if missing)")
    try:
        _probe(out)
    except OSError as exc:
        raise InputError(f"cannot write to {option} {text} ({os_problem(exc)}); choose a folder you can "
                         "write to") from None


def check_new_dir(path: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse, before any work, a folder to be written whole beside itself and renamed into place
    (`index build --out`, `fit --out`) whose parent cannot be written."""
    text = os.fspath(path)
    if not text.strip():
        raise InputError(f"{option} '' names no folder: give one")
    problem = name_problem(text)
    if problem:
        raise InputError(f"{option} {text}: {problem}")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{option} {text} is a file, not a folder; choose a folder")
    parent = p.absolute().parent
    try:
        _probe(parent)
    except OSError as exc:
        raise InputError(f"cannot write to {option} {text}: its folder {parent} cannot be written "
                         f"({os_problem(exc)}); choose a place you can write to") from None


def check_out_file(path: str | os.PathLike[str], option: str) -> None:
    """Refuse, before any work, an output file that cannot be written (`eval --rows`); an existing
    file is left as it is until the work is done."""
    text = os.fspath(path)
    if not text.strip():
        raise InputError(f"{option} '' names no file: give one")
    problem = name_problem(text)
    if problem:
        raise InputError(f"{option} {text}: {problem}")
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{option} {text} is a folder, not a file; name a file")
    try:
        p.absolute().parent.mkdir(parents=True, exist_ok=True)
        existed = p.exists()
        with open(p, "ab"):
            pass
        if not existed:
            p.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to {option} {text} ({os_problem(exc)}); choose a file you can "
                         "write to") from None


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


def warm_face_detector(cropper: Any) -> None:
    """Build the face detector (if the config may use it) before the first batch: importing
    MediaPipe keeps the frames it was first imported from alive for the life of the process, and
    with them the first batch's decoded images (GBs for large ones) when that import happens
    inside a crop."""
    cfg = getattr(cropper, "cfg", None)
    if cfg is None or getattr(cfg.loop, "keep_faces", "off") == "off":
        return
    try:
        from cropper_engine.engine.subject import face_detector

        face_detector()
    except Exception:  # no detector here: the crop says so in its turn
        pass


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


@dataclass
class BatchSummary:
    images: int = 0
    results: int = 0
    skipped: int = 0  # already done (--resume)
    errors: list[str] = field(default_factory=list)
    pipelines: dict[str, int] = field(default_factory=dict)
    not_read: list[tuple[str, str]] = field(default_factory=list)  # (file, why) a folder walk passed over
    stopped: str | None = None  # why the run stopped before its end (a full disk), and what to do


class _Stop(Exception):
    """The run cannot go on (a full disk, a results.jsonl that cannot grow)."""


def ignore_sigxfsz() -> None:
    """A write past the file-size limit (ulimit -f) sends SIGXFSZ, whose default action kills the
    process: ignored, the write fails with EFBIG instead and is named. (CPython ignores it at
    start-up already; a program embedding this one may not.)"""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


RESUME_HINT = "run the same command with --resume: it crops again what results.jsonl does not hold"


def _fix(exc: OSError) -> str:
    if is_disk_full(exc):
        return "free some space"
    if exc.errno == errno.EFBIG:
        return "raise the file-size limit (ulimit -f unlimited)"
    return "fix that"


def _write_failure(image: str, what: str, exc: BaseException) -> tuple[str, bool]:
    """(the message, whether the run must stop) for a failed write of an image's crop or files."""
    if not isinstance(exc, OSError):
        return f"{image}: cannot write {what} ({exc})", False
    where = f" {exc.filename}" if exc.filename else ""
    problem = os_problem(exc)
    if is_disk_full(exc):
        return (f"{image}: cannot write {what}{where}: {problem}; the run stopped here: free some space, "
                f"then {RESUME_HINT}"), True
    if exc.errno == errno.EFBIG:
        return (f"{image}: cannot write {what}{where}: {problem}; raise the limit (ulimit -f unlimited) or "
                f"make the crops smaller (--size WxH), then {RESUME_HINT}"), False
    return f"{image}: cannot write {what}{where} ({problem}); {RESUME_HINT}", False


def run_batch(
    cropper: Any,
    sources: Sequence[str],
    *,
    task: Task,
    ratios: list[Ratio],
    mask: str | None,
    out_dir: str | None,
    size: tuple[int, int] | None = None,
    resume: bool = False,
    batch_size: int = 8,
    emit: Callable[[dict[str, Any]], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    report: Any | None = None,
    subject: Any = None,
    keep_faces: bool | None = None,
    save_prompts: bool = False,
    on_note: Callable[[str], None] | None = None,
    crop_format: str | None = None,
) -> BatchSummary:
    """Crop everything in `sources`; write crops and results.jsonl under `out_dir` (if given).

    `subject` (a `--subject` spec) and `keep_faces` apply to every input; a manifest line's own
    "subject" or "mask" wins over them. `save_prompts`: every VLM prompt and raw answer goes to
    OUT/prompts/<the crop's name>/round<r>.txt, listed in the row's "prompts". `crop_format`
    (--format: jpg, png, webp, tif, heic, avif) writes every crop in that format; by default a
    crop has its input's format, JPEG for HEIC and AVIF photos, PNG for the rest.

    A crop and its row are written whole or not at all; a full disk (or a results.jsonl that
    cannot grow) stops the run: `summary.stopped` says why, and `resume` finishes it."""
    summary = BatchSummary()
    if save_prompts:
        if not out_dir:
            raise InputError("--save-prompts needs --out DIR (the prompts are written to DIR/prompts/)")
        cropper.record_prompts = True
    logs: dict[str, JsonLines] = {}
    lost: list[str] = []  # the logs that could not be written (named once)

    def log(name: str, row: dict[str, Any]) -> None:
        if name not in logs:
            return
        try:
            logs[name].append(row)
        except OSError as exc:
            if name not in lost:
                lost.append(name)
                if on_note:
                    on_note(f"cannot write {logs[name].path} ({os_problem(exc)}); its messages are shown "
                            "here only")

    def err(msg: str) -> None:
        summary.errors.append(msg)
        if on_error:
            on_error(msg)
        log(ERRORS, {"error": msg})

    def not_read(path: str, why: str) -> None:
        summary.not_read.append((path, why))
        log(SKIPPED, {"file": path, "reason": why})

    writer = None
    done: set[tuple[str, str | None]] = set()
    results_path = None
    if out_dir is not None and not out_dir.strip():
        raise InputError("--out '' names no folder: give one, or leave --out out to print the results only")
    if out_dir:
        out = Path(out_dir)
        results_path = out / RESULTS
        if results_path.exists() and not resume:
            raise InputError(f"{results_path} exists from an earlier run: pass --resume to continue it, "
                             "or choose another --out")
        check_out_dir(out)
        if resume:
            note = repair_results(results_path)
            if note and on_note:
                on_note(note)
        done = load_done(results_path) if resume else set()
        check_out_format(crop_format)
        writer = OutputWriter(out, size, fmt=crop_format)
        if resume:  # an earlier run's crops stay theirs; those it left without a row are taken again
            writer.used |= load_outputs(results_path)
        writer.orphans = scan_crops(out / "crops", writer.used if resume else None)
        try:
            logs[RESULTS] = JsonLines(results_path)
            logs[ERRORS] = JsonLines(out / ERRORS)
            logs[SKIPPED] = JsonLines(out / SKIPPED, truncate=True)  # the files this run's walk passed over
        except OSError as exc:
            for f in logs.values():
                f.close()
            raise InputError(f"cannot write to --out {out_dir} ({os_problem(exc)}); free some space or "
                             "choose another folder") from None
        ignore_sigxfsz()
    warm_face_detector(cropper)

    def flush(batch: list[tuple[InputItem, CropRequest]]) -> None:
        outs = cropper.crop_batch([r for _, r in batch])
        batch_items = list(zip(batch, outs, strict=True))
        batch.clear()
        for (item, _req), res in batch_items:
            summary.images += 1
            if isinstance(res, CropperError):
                err(f"{item.path}: {res}" if item.path not in str(res) else str(res))
            else:
                try:
                    for r in res:
                        keep(item, r)
                finally:  # its crops are written: the full-size decode goes (the reduced one is small)
                    for r in res:
                        if r.loaded is not None:
                            r.loaded.release()
            if on_progress:
                on_progress(1)

    def keep(item: InputItem, r: CropResult) -> None:
        """One crop: its file, its prompts, its row, its report card, in that order; a row only
        once its crop is whole, and no crop left without its row."""
        loaded = r.loaded
        row = with_image_notes(r.to_json(), loaded)
        row["image"] = resolved(item.path)
        what = f"its {r.ratio} crop" if r.ratio is not None else "its crop"
        written: list[Path] = []
        if writer is not None:
            try:
                written.append(writer.write(item, r, loaded.image, loaded.icc_profile))
            except (ImageError, OSError) as exc:
                msg, stop = _write_failure(item.path, what, exc)
                if stop:
                    raise _Stop(msg) from None
                err(msg)
                return
            row["output"] = str(written[0])
            if r.prompts:
                try:
                    row["prompts"] = write_prompts(writer.out_dir, written[0], row, r.prompts)
                except OSError as exc:
                    msg, stop = _write_failure(item.path, f"the prompts of {what}", exc)
                    if stop:
                        _discard(written)
                        raise _Stop(msg) from None
                    err(msg)
        if RESULTS in logs:
            try:
                logs[RESULTS].append(row)
            except OSError as exc:
                _discard(written)  # no crop without its row: --resume crops it again
                raise _Stop(f"{item.path}: cannot add its row to {results_path or RESULTS}: "
                            f"{os_problem(exc)}; the run stopped here (its crop was removed): {_fix(exc)}, "
                            f"then {RESUME_HINT}") from None
        if report is not None:
            try:
                report.add(row, loaded.image)
            except OSError as exc:
                if not is_disk_full(exc):
                    err(f"{item.path}: the report misses {what} ({os_problem(exc)}); the crop and its row "
                        "are written")
                else:  # the row and the crop go too: --resume crops the image again, its card with it
                    try:
                        logs[RESULTS].undo()
                    except (KeyError, OSError):
                        pass
                    _discard(written)
                    raise _Stop(f"{item.path}: cannot add {what} to the report: {os_problem(exc)}; the run "
                                f"stopped here: free some space, then {RESUME_HINT}") from None
        summary.results += 1
        summary.pipelines[r.pipeline] = summary.pipelines.get(r.pipeline, 0) + 1
        if emit:
            emit(row)

    try:
        batch: list[tuple[InputItem, CropRequest]] = []
        for item in iter_inputs(sources, err, out_dir, not_read):
            if writer is not None:
                writer.inputs.add(resolved(item.path))
            it_task = item.task or task
            it_ratios = item.ratios or ratios
            own = item.subject is not None or item.mask is not None  # the line names its subject
            it_subject = item.subject if own else subject
            if item.task is None and item.ratios:  # a line's own ratio makes it a ratio crop
                it_task = Task.RATIO
            elif item.task is None and own and task is Task.FREE:  # as the CLI infers it from its flags
                it_task = Task.SUBJECT
            problem = None
            if it_task is Task.RATIO and not it_ratios:
                problem = ('"task": "ratio" needs a ratio: add "ratio": "W:H" to its manifest line '
                           "(or pass --ratio W:H)")
            elif it_task is not Task.RATIO and item.ratios:
                problem = f'"ratio" only applies to the ratio task (not "task": "{it_task.value}")'
            if problem:
                err(f"{item.path}: {problem}")
                if on_progress:
                    on_progress(1)
                continue
            if it_task is Task.RATIO:
                todo = [r for r in it_ratios if (resolved(item.path), str(r)) not in done]
                if not todo:
                    summary.skipped += 1
                    if on_progress:
                        on_progress(1)
                    continue
                it_ratios = todo
            elif (resolved(item.path), None) in done:
                summary.skipped += 1
                if on_progress:
                    on_progress(1)
                continue
            try:
                req = CropRequest(item.path, it_task, it_ratios if it_task is Task.RATIO else [],
                                  None if it_subject is not None else item.mask or mask, id=Path(item.path).name,
                                  subject=it_subject, keep_faces=keep_faces)
            except CropperError as exc:
                err(f"{item.path}: {exc}")
                if on_progress:
                    on_progress(1)
                continue
            batch.append((item, req))
            if len(batch) >= batch_size:
                flush(batch)
        if batch:
            flush(batch)
    except _Stop as stop:
        summary.stopped = str(stop)
        summary.errors.append(str(stop))
        log(ERRORS, {"error": str(stop), "stopped": True})
    finally:
        for f in logs.values():
            f.close()
    return summary


def _discard(paths: list[Path]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def write_prompts(out_dir: Path, output: Path, row: dict[str, Any], prompts: list[dict[str, Any]]) -> list[str]:
    """OUT/prompts/<crop name>/round<r>[-attempt<k>].txt: each VLM call's prompt text (images named
    where they stand) and its raw answers, each file written whole. Returns the files, relative to OUT."""
    rel = output.relative_to(out_dir / "crops").with_suffix("")
    folder = out_dir / PROMPTS / rel
    folder.mkdir(parents=True, exist_ok=True)
    what = row["task"] + (f" {row['ratio']}" if row.get("ratio") else "")
    files = []
    for p in prompts:
        name = f"round{p['round']}" + (f"-attempt{p['attempt']}" if p.get("attempt", 1) > 1 else "") + ".txt"
        cut = p.get("cut") or [False] * len(p["answers"])
        answers = "".join(f"\n===== answer {k} (raw{', cut at the token limit: not used' if c else ''}) =====\n{a}\n"
                          for k, (a, c) in enumerate(zip(p["answers"], cut, strict=False), 1)) \
            or "\n===== no answer (the VLM call failed; see the row's notes) =====\n"
        text = (f"# image: {shown(row['image'])}\n# task: {what}; round {p['round']}, attempt {p.get('attempt', 1)}\n"
                "# The text the VLM read, each image named where it stands as <image: ...>; the model's chat\n"
                "# template wraps it (role markers, image tokens).\n"
                f"===== prompt =====\n{p['prompt']}\n{answers}")
        atomic_write(folder / name, text.encode("utf-8", "backslashreplace"))
        files.append(str((folder / name).relative_to(out_dir)))
    return files
