"""Where a run writes: the output places checked before any work (`check_out_dir`,
`check_new_dir`, `check_out_file`, `check_out_format`), the crops' names and formats and their
writer (`OutputWriter`: OUT/crops/, never an input, an existing file or a name given twice),
and the prompt files (`write_prompts`)."""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from cropper_engine.batch.atomic import atomic_write
from cropper_engine.batch.inputs import InputItem, out_rel
from cropper_engine.batch.names import NAME_MAX, PROMPTS, TMP_PREFIX, name_problem, os_problem, resolved, shown
from cropper_engine.errors import InputError
from cropper_engine.imageio import AVIF_SUFFIXES, HEIF_SUFFIXES
from cropper_engine.types import CropResult, Ratio


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


def _checked_folder(path: str | os.PathLike[str], option: str, created: str) -> tuple[str, Path]:
    """The folder an option names, refused when empty, badly named or a file: (its text, path)."""
    text = os.fspath(path)
    if not text.strip():
        raise InputError(f"{option} '' names no folder: give one{created}")
    problem = name_problem(text)
    if problem:
        raise InputError(f"{option} {text}: {problem}")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{option} {text} is a file, not a folder; choose a folder{created}")
    return text, p


def check_out_dir(out_dir: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse an output folder that cannot be written (read-only, /proc, a file), before any work."""
    text, out = _checked_folder(out_dir, option, " (it is created if missing)")
    try:
        _probe(out)
    except OSError as exc:
        raise InputError(f"cannot write to {option} {text} ({os_problem(exc)}); choose a folder you can "
                         "write to") from None


def check_new_dir(path: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse, before any work, a folder to be written whole beside itself and renamed into place
    (`index build --out`, `fit --out`) whose parent cannot be written."""
    text, p = _checked_folder(path, option, "")
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
