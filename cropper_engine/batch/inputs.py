"""What a run reads: image files, folders (walked lazily, one directory listing at a time, links
to folders followed, each folder once) and manifests (.txt: one path per line; .jsonl: {"image",
"ratio"?, "mask"?, "subject"?, "task"?}), as `InputItem`s (`iter_inputs`); what a folder walk does
not read, each with why (`walk_suffixes`, `unread_reason`); where an image's crops go under
crops/ (`out_rel`)."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from cropper_engine.batch.names import OWN_FILES, PROMPTS, TMP_PREFIX, name_problem, os_problem, resolved
from cropper_engine.errors import InputError
from cropper_engine.imageio import AVIF_SUFFIXES, HEIF_SUFFIXES, NO_AVIF, NO_HEIC, is_image_path
from cropper_engine.types import Ratio, Task, parse_ratios


@dataclass
class InputItem:
    path: str
    rel: str  # path relative to its input root, for output naming
    ratios: list[Ratio] | None = None
    mask: str | None = None
    task: Task | None = None
    subject: str | None = None


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
