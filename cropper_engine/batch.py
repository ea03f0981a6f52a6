"""Offline batch cropping: stream inputs, crop in batches, write crops + results.jsonl, resume.

Inputs are image files, directories (walked lazily, one directory listing at a time) and
manifests (.txt: one path per line; .jsonl: {"image", "ratio"?, "mask"?, "subject"?, "task"?}, where
"subject" is a `--subject` spec: auto, face, person, saliency, "X,Y", "X1,Y1,X2,Y2" or a mask path). Nothing
holds more than one batch of decoded images. Outputs never overwrite an input or an existing
file and never collide, across resumed runs too; `resume` skips what results.jsonl already holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cropper_engine.errors import CropperError, ImageError, InputError
from cropper_engine.imageio import IMAGE_SUFFIXES, is_image_path, with_image_notes
from cropper_engine.types import CropRequest, CropResult, Ratio, Task

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
PROMPTS = "prompts"
PARTIAL = "results.partial.jsonl"  # where resume sets aside a half-written last line


def resolved(path: str | os.PathLike[str]) -> str:
    """The absolute path with links followed where they resolve; a loop of links or a name
    the file system refuses stays as given (made absolute), for the error to name it."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # RuntimeError: "Symlink loop" (Python < 3.13)
        return os.path.abspath(path)


@dataclass
class InputItem:
    path: str
    rel: str  # path relative to its input root, for output naming
    ratios: list[Ratio] | None = None
    mask: str | None = None
    task: Task | None = None
    subject: str | None = None


def iter_inputs(sources: Sequence[str], on_error: Callable[[str], None],
                skip_dir: str | os.PathLike[str] | None = None) -> Iterator[InputItem]:
    """Images from files, directories (recursive, sorted per directory) and manifests; a walk
    never enters `skip_dir` (the output folder, which may sit inside an input folder) nor what
    this tool writes there (crops/, report/), even when `skip_dir` is the walked folder itself."""
    skip: frozenset[Path] = frozenset()
    if skip_dir:
        out = Path(skip_dir).resolve()
        skip = frozenset({out, out / "crops", out / "report"})
    for src in sources:
        p = Path(src)
        if _link_loop(p):
            on_error(f"{src}: a loop of symbolic links (it points back to itself); fix or remove the link")
            continue
        if p.is_dir():
            yield from _walk(p, p, skip)
        elif p.suffix.lower() in (".txt", ".jsonl") and p.is_file():
            yield from _manifest(p, on_error)
        elif p.exists() or is_image_path(p):
            yield InputItem(str(p), p.name)
        else:
            on_error(f"{src}: no such file or directory")


def _walk(root: Path, d: Path, skip: frozenset[Path] = frozenset()) -> Iterator[InputItem]:
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        if _is_dir(e):
            if skip and Path(resolved(e.path)) in skip:
                continue
            yield from _walk(root, Path(e.path), skip)
        elif Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
            yield InputItem(e.path, os.path.relpath(e.path, root))


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _link_loop(p: Path) -> bool:
    """A symbolic link that never reaches a file (it points, maybe through others, to itself)."""
    try:
        if not p.is_symlink():
            return False
        os.stat(p)
    except OSError as exc:
        import errno

        return exc.errno == errno.ELOOP
    return False


def _manifest(p: Path, on_error: Callable[[str], None]) -> Iterator[InputItem]:
    base = p.parent
    with p.open() as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if p.suffix.lower() == ".txt":
                path = line if os.path.isabs(line) else str(base / line)
                yield InputItem(path, line.lstrip("/"))
                continue
            try:
                d = json.loads(line)
                img = str(d["image"])
                ratios = None
                if d.get("ratio"):
                    r = d["ratio"]
                    ratios = [Ratio.parse(x) for x in (r if isinstance(r, list) else str(r).split(","))]
                task = Task.parse(d["task"]) if d.get("task") else None
                mask = d.get("mask")
                if mask and not os.path.isabs(mask):
                    mask = str(base / mask)
                subject = d.get("subject")
                if subject is not None:
                    from cropper_engine.engine.subject import SubjectSpec

                    spec = SubjectSpec.parse(subject)
                    subject = str(base / spec.path) if spec.kind == "mask" and not os.path.isabs(spec.path) \
                        else subject
            except (json.JSONDecodeError, KeyError, TypeError, InputError) as exc:
                on_error(f"{p}:{n}: bad manifest line ({exc})")
                continue
            path = img if os.path.isabs(img) else str(base / img)
            yield InputItem(path, img.lstrip("/"), ratios, mask, task, subject)


def count_inputs(sources: Sequence[str], skip_dir: str | None = None) -> int | None:
    """A quick count for the progress bar (names only)."""
    n = 0
    for item in iter_inputs(sources, lambda _m: None, skip_dir):
        del item
        n += 1
    return n


def ratio_tag(r: Ratio | None) -> str:
    return "" if r is None else "_" + str(r).replace(":", "x").replace(".", "p")


@dataclass
class OutputWriter:
    out_dir: Path
    size: tuple[int, int] | None = None
    inputs: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)
    quality: int = 95

    def path_for(self, item: InputItem, ratio: Ratio | None) -> Path:
        rel = Path(item.rel)
        suffix = rel.suffix.lower() if rel.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".tif",
                                                              ".tiff") else ".png"
        stem = rel.with_suffix("")
        base = self.out_dir / "crops" / f"{stem}{ratio_tag(ratio)}"
        cand = base.with_suffix(suffix)
        k = 1
        while str(cand.resolve()) in self.used or str(cand.resolve()) in self.inputs or cand.exists():
            cand = Path(f"{base}-{k}{suffix}")
            k += 1
        self.used.add(str(cand.resolve()))
        return cand

    def write(self, item: InputItem, result: CropResult, image: Any, icc: bytes | None) -> Path:
        from PIL import Image

        out = self.path_for(item, result.ratio)
        out.parent.mkdir(parents=True, exist_ok=True)
        crop = image.crop(tuple(result.box.as_int()))
        if self.size:
            w, h = self.size
            if crop.width > w or crop.height > h:  # never upscale
                crop.thumbnail((w, h), Image.Resampling.LANCZOS)
        kw: dict[str, Any] = {}
        if icc:
            kw["icc_profile"] = icc
        ext = out.suffix.lower()
        if ext in (".jpg", ".jpeg"):
            kw.update(quality=self.quality, subsampling=0)
        tmp = out.with_name(out.name + ".part")
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF",
               ".tiff": "TIFF"}[ext]
        crop.save(tmp, format=fmt, **kw)
        os.replace(tmp, out)
        return out


def check_out_dir(out_dir: str | os.PathLike[str]) -> None:
    """Refuse an --out folder that cannot be written (read-only, /proc, a file), before any work."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out_dir} is a file, not a folder; choose a folder (it is created if missing)")
    probe = out / f".cropper-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as fh:
            fh.write("ok\n")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to --out {out_dir} ({exc.strerror or exc}); choose a folder you can "
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
            whole = isinstance(json.loads(tail), dict)
        except (ValueError, UnicodeDecodeError):
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
    if not results_path.exists():
        return
    with results_path.open() as fh:
        for line in fh:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(d, dict):
                yield d


@dataclass
class BatchSummary:
    images: int = 0
    results: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    pipelines: dict[str, int] = field(default_factory=dict)


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
) -> BatchSummary:
    """Crop everything in `sources`; write crops and results.jsonl under `out_dir` (if given).

    `subject` (a `--subject` spec) and `keep_faces` apply to every input; a manifest line's own
    "subject" or "mask" wins over them. `save_prompts`: every VLM prompt and raw answer goes to
    OUT/prompts/<the crop's name>/round<r>.txt, listed in the row's "prompts"."""
    summary = BatchSummary()
    if save_prompts:
        if not out_dir:
            raise InputError("--save-prompts needs --out DIR (the prompts are written to DIR/prompts/)")
        cropper.record_prompts = True

    def err(msg: str) -> None:
        summary.errors.append(msg)
        if on_error:
            on_error(msg)
        if errors_fh:
            errors_fh.write(json.dumps({"error": msg}) + "\n")
            errors_fh.flush()

    writer = None
    results_fh = errors_fh = None
    done: set[tuple[str, str | None]] = set()
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
        writer = OutputWriter(out, size)
        if resume:  # an earlier run's crops stay theirs
            writer.used |= load_outputs(results_path)
        results_fh = results_path.open("a")
        errors_fh = (out / ERRORS).open("a")
    warm_face_detector(cropper)
    try:
        batch: list[tuple[InputItem, CropRequest]] = []
        for item in iter_inputs(sources, err, out_dir):
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
                _flush(cropper, batch, summary, writer, results_fh, emit, err, on_progress, report)
        if batch:
            _flush(cropper, batch, summary, writer, results_fh, emit, err, on_progress, report)
    finally:
        if results_fh:
            results_fh.close()
        if errors_fh:
            errors_fh.close()
    return summary


def _flush(cropper: Any, batch: list[tuple[InputItem, CropRequest]], summary: BatchSummary,
           writer: OutputWriter | None, results_fh: Any, emit: Callable[[dict[str, Any]], None] | None,
           err: Callable[[str], None], on_progress: Callable[[int], None] | None, report: Any) -> None:
    outs = cropper.crop_batch([r for _, r in batch])
    for (item, _req), res in zip(batch, outs, strict=True):
        summary.images += 1
        if isinstance(res, CropperError):
            err(f"{item.path}: {res}" if str(item.path) not in str(res) else str(res))
            continue
        for r in res:
            loaded = r.loaded
            row = with_image_notes(r.to_json(), loaded)
            row["image"] = resolved(item.path)
            if writer is not None:
                try:
                    row["output"] = str(writer.write(item, r, loaded.image, loaded.icc_profile))
                except (ImageError, OSError) as exc:
                    err(f"{item.path}: cannot write the crop ({exc})")
                    continue
                if r.prompts:
                    try:
                        row["prompts"] = write_prompts(writer.out_dir, Path(row["output"]), row, r.prompts)
                    except OSError as exc:
                        err(f"{item.path}: cannot write its prompts ({exc})")
            if results_fh:
                results_fh.write(json.dumps(row) + "\n")
                results_fh.flush()
            if emit:
                emit(row)
            if report is not None:
                report.add(row, loaded.image)
            summary.results += 1
            summary.pipelines[r.pipeline] = summary.pipelines.get(r.pipeline, 0) + 1
        if on_progress:
            on_progress(1)
    batch.clear()


def write_prompts(out_dir: Path, output: Path, row: dict[str, Any], prompts: list[dict[str, Any]]) -> list[str]:
    """OUT/prompts/<crop name>/round<r>[-attempt<k>].txt: each VLM call's prompt text (images named
    where they stand) and its raw answers. Returns the files, relative to OUT."""
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
        text = (f"# image: {row['image']}\n# task: {what}; round {p['round']}, attempt {p.get('attempt', 1)}\n"
                "# The text the VLM read, each image named where it stands as <image: ...>; the model's chat\n"
                "# template wraps it (role markers, image tokens).\n"
                f"===== prompt =====\n{p['prompt']}\n{answers}")
        (folder / name).write_text(text, encoding="utf-8")
        files.append(str((folder / name).relative_to(out_dir)))
    return files
