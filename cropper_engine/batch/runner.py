"""The run: `run_batch` streams the inputs, crops them in batches and keeps each crop (its file,
prompts, row and report card, in that order); a failed write is named, and a full disk stops the
run cleanly (`BatchSummary.stopped`) for --resume to finish."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cropper_engine.batch.atomic import JsonLines
from cropper_engine.batch.inputs import InputItem, iter_inputs
from cropper_engine.batch.names import ERRORS, RESULTS, SKIPPED, is_disk_full, os_problem, resolved
from cropper_engine.batch.outputs import OutputWriter, check_out_dir, check_out_format, write_prompts
from cropper_engine.batch.resume import load_done, load_outputs, repair_results, scan_crops
from cropper_engine.errors import CropperError, ImageError, InputError
from cropper_engine.imageio import with_image_notes
from cropper_engine.types import CropRequest, CropResult, Ratio, Task


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
