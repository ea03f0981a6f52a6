"""The `cropper-engine` command line: a thin adapter over the library.

It parses options, builds the config, calls the library and turns a CropperError into a
one-line message (no traceback). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

DATASET_KINDS = ["fcdb", "gaicd", "sacd", "jsonl"]


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """CropperError (a user's mistake or a missing model) -> ClickException, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cropper_engine.errors import CropperError

        try:
            return fn(*args, **kwargs)
        except CropperError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def load_cfg(ctx: click.Context, **flags: Any) -> Any:
    from cropper_engine.config import load_config

    if ctx.obj and ctx.obj.get("default_model"):  # --default-model (default_model_option)
        flags["default_model"] = ctx.obj["default_model"]
    return load_config(ctx.obj.get("config") if ctx.obj else None, overrides=flags)


def default_model_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--default-model DIR (a model of `cropper-engine fit`), for `crop`, `eval` and `serve`: kept
    in the context for `load_cfg`, so the commands' own signatures stay as they are."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        value = kwargs.pop("default_model", None)
        ctx = click.get_current_context()
        ctx.ensure_object(dict)
        if value:
            ctx.obj["default_model"] = value
        return fn(*args, **kwargs)

    return click.option(
        "--default-model", "default_model", type=click.Path(), default=None, metavar="MODEL_DIR",
        help="Rank the no-VLM default's crops (and the VLM loop's fallback) with a model fitted to your own "
             "crops by `cropper-engine fit` [default: the shipped model; config key default_model].")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A TOML config file (defaults < file < CROPPER_* environment < flags).")
@click.version_option(package_name="cropper-engine")
@click.pass_context
def main(ctx: click.Context, config_file: str | None) -> None:
    """Crop images with an open vision-language model through in-context learning.

    \b
    Start here:
      cropper-engine crop photo.jpg --out crops/        crop with the best pipeline available
      cropper-engine crop DIR --task ratio --ratio 1:1,16:9 --out crops/ --report
      cropper-engine index build --dataset fcdb --annotations train.jsonl --out idx/
      cropper-engine eval --dataset fcdb --annotations val.jsonl --method center --ratio-from-gt
      cropper-engine models list                        which VLMs are known and present here
      cropper-engine fit --dataset jsonl --annotations my_crops.jsonl --out my_model/
                                                        fit the no-VLM default to your own crops
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_file
    lenient_stdio()


def lenient_stdio() -> None:
    """A file name that is not UTF-8 (held as surrogate escapes) is printed as \\udcXX, the escape
    results.jsonl and errors.jsonl write for it, instead of ending the command with a
    UnicodeEncodeError (and its summary lost)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            pass


# --- eval -------------------------------------------------------------------------------


def dataset_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--dataset", "kind", type=click.Choice(DATASET_KINDS), required=True,
                     help="Annotation format (jsonl: our own format, see the README)."),
        click.option("--annotations", type=click.Path(), required=True,
                     help="Annotation file (or, for gaicd text files / sacd, a directory)."),
        click.option("--images", type=click.Path(), default=None,
                     help="Image directory [default: 'images' next to the annotations]."),
        click.option("--split", default=None, help="GAICD split (train|test) from original_data_split.json."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N examples."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def subject_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--subject and --keep-faces (engine/subject/), for `crop` and `eval`."""
    fn = click.option("--keep-faces/--no-keep-faces", "keep_faces", default=None,
                      help="No crop cuts through a detected face; at a ratio that leaves no way round it, the "
                           "crop keeps the best-ranked face and says so [default: on wherever a face detector is "
                           "installed (the subject extra); loop.keep_faces = auto | on | off].")(fn)
    return click.option("--subject", "subject_text", default=None, metavar="SPEC",
                        help="The subject, without a hand-made mask: auto (faces, else persons, else the salient "
                             "region; the result says which), face, person, saliency, X,Y (a focal point, px), "
                             "X1,Y1,X2,Y2 (a box, px) or MASK.png. Implies --task subject; with --ratio, every "
                             "crop keeps it inside.")(fn)


def read_examples(kind: str, annotations: str, images: str | None, split: str | None,
                  limit: int | None, require_images: bool = True) -> Any:
    from cropper_engine.data.readers import read_dataset

    ds = read_dataset(kind, annotations, images, split=split, limit=limit, require_images=require_images)
    for line in summarise_skipped(ds.skipped):
        click.echo(f"skipped: {line}", err=True)
    return ds


def summarise_skipped(messages: list[str], show: int = 5) -> list[str]:
    """A few messages as they are; the rest grouped by their kind ("image file ... not found")."""
    import re

    if len(messages) <= show:
        return list(messages)
    groups: dict[str, int] = {}
    for m in messages:
        kind = re.sub(r"\S*[/\\]\S*|\d+(\.\d+)?", "…", m.partition(": ")[2] or m)
        groups[kind] = groups.get(kind, 0) + 1
    out = list(messages[:show])
    out += [f"{n} x {kind}" for kind, n in sorted(groups.items(), key=lambda kv: -kv[1])]
    return out


@main.command("eval")
@default_model_option
@dataset_options
@click.option("--method", default="center", show_default=True,
              help="center | full | cropper (the whole pipeline).")
@click.option("--ratio-from-gt", is_flag=True, help="Give the method the ground truth's aspect ratio.")
@click.option("--index", "index_dir", type=click.Path(), default=None,
              help="Example index for the cropper method [default: the built-in table].")
@click.option("--vlm", default=None, help="auto | none | a model name or folder (cropper method).")
@click.option("--backend", default=None, help="auto | transformers | vllm | openai (cropper method).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
@click.option("--rows", type=click.Path(dir_okay=False), default=None,
              help="Write one JSON line per image (its box, IoU, Disp) to this file.")
@subject_options
@click.pass_context
@friendly_errors
def eval_cmd(ctx: click.Context, kind: str, annotations: str, images: str | None, split: str | None,
             limit: int | None, method: str, ratio_from_gt: bool, index_dir: str | None,
             vlm: str | None, backend: str | None, as_json: bool, rows: str | None,
             subject_text: str | None, keep_faces: bool | None) -> None:
    """Run a cropping method over an annotated dataset; print IoU / Disp (and Acc, SRCC, PCC
    where the set has scored candidates, as GAICD does).

    \b
    Example (the literature's protocol on FCDB, the ratio given):
      cropper-engine eval --dataset fcdb --annotations ../shared/data/fcdb/val.jsonl \\
          --method center --ratio-from-gt
    With --method cropper, --subject (e.g. auto) replaces the dataset's masks by automatic
    subjects, and --keep-faces keeps detected faces whole.
    """
    from tqdm import tqdm

    from cropper_engine.evaluate import METHODS, evaluate

    factory = METHODS.get(method)  # an unknown method fails before anything is read
    cfg = load_cfg(ctx, **{"index": index_dir, "vlm.model": vlm, "vlm.backend": backend})
    spec = parse_subject_option(subject_text, None, keep_faces)
    if (spec is not None or keep_faces) and method != "cropper":
        from cropper_engine.errors import InputError

        raise InputError(f"--subject and --keep-faces need --method cropper (not {method})")
    if rows is not None:  # an unwritable --rows is refused before the work, not after it
        from cropper_engine.batch import check_out_file

        check_out_file(rows, "--rows")
    ds = read_examples(kind, annotations, images, split, limit)
    if not ds.examples:
        raise click.ClickException("no usable examples in the dataset (see the messages above)")
    m = factory(cfg) if _wants_config(factory) else factory()
    if spec is not None or keep_faces is not None:  # the cropper method: every image's subject
        m.subject, m.keep_faces = spec, keep_faces
    with tqdm(total=len(ds.examples), desc=f"eval {method}", unit="img", file=sys.stderr,
              disable=None) as bar:
        report = evaluate(ds.examples, m, ratio_from_gt=ratio_from_gt,
                          on_progress=bar.update,
                          on_error=lambda msg: tqdm.write(f"error: {msg}", file=sys.stderr))
    m.close()
    s = report.summary
    s["skipped"] = ds.n_skipped  # records, as `index build` counts them (dropped boxes are not records)
    if rows:
        from pathlib import Path

        from cropper_engine.batch import atomic_write

        try:
            atomic_write(Path(rows), "".join(json.dumps(r) + "\n" for r in report.rows).encode("ascii"))
        except OSError as exc:  # the summary below is still printed
            from cropper_engine.batch import os_problem

            click.echo(f"error: cannot write --rows {rows} ({os_problem(exc)})", err=True)
            report.errors.append(f"--rows {rows}: {exc}")
    click.echo(format_summary(s))
    if as_json:
        click.echo(json.dumps(s))
    if report.errors:
        sys.exit(1)


def _wants_config(factory: Any) -> bool:
    import inspect

    try:
        return bool(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return False


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"method {s.get('method')}  ratio from gt: {'yes' if s.get('ratio_from_gt') else 'no'}  "
             f"images: {s.get('n')}  skipped: {s.get('skipped', 0)}  errors: {s.get('errors', 0)}  "
             f"time: {s.get('seconds')} s"]
    if s.get("n"):
        lines.append(f"IoU {s['iou']:.4f}   Disp {s['disp']:.4f}   alpha-recall(0.75) "
                     f"{s['alpha_recall']:.4f}")
    if s.get("n_ranked"):
        lines.append(f"Acc5 {100 * s['acc5']:.1f}   Acc10 {100 * s['acc10']:.1f}   "
                     f"SRCC {s['srcc']:.3f}   PCC {s['pcc']:.3f}   (over {s['n_ranked']} images)")
    if s.get("pipelines"):
        lines.append("pipelines: " + ", ".join(f"{k or '-'} {v}" for k, v in s["pipelines"].items()))
    if s.get("subjects"):
        lines.append("subjects: " + ", ".join(f"{k} {v}" for k, v in s["subjects"].items()))
    return "\n".join(lines)


# --- crop -------------------------------------------------------------------------------


def parse_ratios(text: str | None) -> list[Any]:
    """--ratio, read as the library, manifests and the server read a ratio (types.parse_ratios)."""
    from cropper_engine.types import parse_ratios as parse

    return parse(text, "--ratio")


def parse_size(text: str | None) -> tuple[int, int] | None:
    from cropper_engine.errors import InputError

    if not text:
        return None
    a, sep, b = text.lower().partition("x")
    try:
        w, h = int(a), int(b)
    except ValueError:
        raise InputError(f"bad --size {text!r}: write it as WxH in pixels, e.g. 1080x1080") from None
    if not sep or w <= 0 or h <= 0:
        raise InputError(f"bad --size {text!r}: write it as WxH in pixels, e.g. 1080x1080")
    return w, h


def precheck_sizes(sources: tuple[str, ...], out_dir: str | None = None) -> list[tuple[str, int, int]]:
    """(path, width, height) of the images to check a subject option against before any work:
    the explicit image files, else the first readable image of the folders and manifests that
    the option applies to (headers only; the others are checked one by one as they are cropped)."""
    from pathlib import Path

    from cropper_engine.batch import iter_inputs
    from cropper_engine.imageio import image_size, is_image_path

    def is_file(src: str) -> bool:
        try:
            return Path(src).is_file()
        except (OSError, ValueError):  # a name the file system refuses: named when its turn comes
            return False

    files = [src for src in sources if is_file(src) and is_image_path(src)]
    if files:
        sizes = []
        for src in files:
            try:
                sizes.append((src, *image_size(src)))
            except Exception:  # ImageError, Pillow's bomb error...: named when its turn comes; the others go on
                continue
        return sizes
    for item in iter_inputs(sources, lambda _m: None, out_dir):
        if item.mask is not None or item.subject is not None:  # a manifest line's own subject
            continue
        try:
            return [(item.path, *image_size(item.path))]
        except Exception:  # named when its turn comes
            continue
    return []


def precheck_mask(mask: str, sources: tuple[str, ...], out_dir: str | None = None,
                  max_pixels: int | None = None) -> None:
    """Refuse a mask that does not fit the images (see precheck_sizes) or the pixel limit, before
    any work starts."""
    from cropper_engine.imageio import DEFAULT_MAX_PIXELS, load_mask

    m = load_mask(mask, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    for src, w, h in precheck_sizes(sources, out_dir):
        if (m.shape[1], m.shape[0]) != (w, h):
            from cropper_engine.errors import InputError

            raise InputError(f"the mask {mask} is {m.shape[1]}x{m.shape[0]} but {src} is {w}x{h}; "
                             "a subject mask must have its image's size")


def parse_subject_option(text: str | None, mask: str | None, keep_faces: bool | None) -> Any:
    """The parsed --subject (or None); refuses it beside --mask, and a detector this machine lacks."""
    from cropper_engine.engine.subject import SubjectSpec, require_detectors
    from cropper_engine.errors import InputError

    if text is not None and mask:
        raise InputError("--mask and --subject both name the subject: give one (--subject MASK.png works too)")
    spec = SubjectSpec.parse(text) if text is not None else None
    if spec is not None or keep_faces:
        require_detectors(spec, keep_faces)
    return spec


def precheck_subject(spec: Any, sources: tuple[str, ...], out_dir: str | None = None,
                     max_pixels: int | None = None) -> None:
    """Refuse a subject mask, focal point or box that does not fit the images (see
    precheck_sizes), before any work starts."""
    if spec is None:
        return
    if spec.kind == "mask":
        precheck_mask(spec.path, sources, out_dir, max_pixels)
    elif spec.kind in ("point", "box"):
        for _src, w, h in precheck_sizes(sources, out_dir):
            spec.check(w, h)


def max_pixels_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--max-pixels", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Refuse images of more pixels than this, before decoding [120000000; "
                             "max_pixels in the config, CROPPER_MAX_PIXELS].")(fn)


@main.command("crop")
@default_model_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--task", type=click.Choice(["free", "subject", "ratio"]), default=None,
              help="free-form [default], subject-aware (needs --mask) or aspect-ratio-aware (needs --ratio).")
@click.option("--ratio", "ratio_text", default=None,
              help="Aspect ratio(s) W:H, comma-separated: one crop per ratio (implies --task ratio).")
@click.option("--mask", type=click.Path(), default=None,
              help="Subject mask image (white = subject, the image's size; implies --task subject; with --ratio, "
                   "every crop keeps it inside).")
@subject_options
@click.option("--index", "index_dir", type=click.Path(), default=None,
              help="Example index directory (see `index build`) [default: the built-in table].")
@click.option("--vlm", default=None,
              help="auto [default]: use the default VLM if its weights are here and a GPU can run it; "
                   "none; a model name (see `models list`); or a local model folder.")
@click.option("--backend", default=None, help="VLM backend: auto | transformers | vllm | openai.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write crops/ and results.jsonl here [default: only print the results].")
@click.option("--size", "size_text", default=None, help="Resize each crop to fit WxH (never upscales).")
@click.option("--format", "crop_format", type=click.Choice(["auto", "jpg", "png", "webp", "tif", "heic", "avif"]),
              default="auto", show_default=True,
              help="The crops' format: auto keeps the input's (JPEG, PNG, WebP, TIFF), writes HEIC and AVIF "
                   "photos as JPEG and the rest as PNG; heic needs pillow-heif's encoder.")
@click.option("--json", "as_json", is_flag=True, help="Print each results.jsonl line to stdout.")
@max_pixels_option
@click.option("--report", is_flag=True, help="Write an HTML contact sheet to OUT/report/index.html.")
@click.option("--resume", is_flag=True, help="Skip images already in OUT/results.jsonl.")
@click.option("--save-prompts", is_flag=True,
              help="Write every VLM prompt (its text, each image named where it stands) and raw answer to "
                   "OUT/prompts/<crop name>/round<r>.txt; the report links them.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=None, help="Images per engine batch.")
@click.option("--candidates", "-R", type=click.IntRange(1, 64), default=None, help="VLM candidates R.")
@click.option("--rounds", "-L", type=click.IntRange(0, 10), default=None, help="Refinement rounds L.")
@click.option("--examples", "-S", type=click.IntRange(0, 200), default=None, help="Retrieved examples S.")
@click.pass_context
@friendly_errors
def crop_cmd(ctx: click.Context, inputs: tuple[str, ...], task: str | None, ratio_text: str | None,
             mask: str | None, subject_text: str | None, keep_faces: bool | None, index_dir: str | None,
             vlm: str | None, backend: str | None,
             out_dir: str | None, size_text: str | None, crop_format: str, as_json: bool,
             max_pixels: int | None, report: bool, resume: bool, save_prompts: bool,
             batch_size: int | None, candidates: int | None, rounds: int | None,
             examples: int | None) -> None:
    """Crop images (files, directories, or .txt / .jsonl manifests).

    \b
    Examples:
      cropper-engine crop photo.jpg                          print the best crop
      cropper-engine crop shoot/ --out crops/ --report       crop a folder, with a contact sheet
      cropper-engine crop shoot/ --ratio 1:1,4:5 --size 1080x1080 --out crops/
      cropper-engine crop portrait.jpg --mask subject.png --out crops/
      cropper-engine crop shoot/ --subject auto --ratio 1:1,16:9 --out crops/   faces (or persons) kept whole
      cropper-engine crop photo.jpg --subject 640,360 --ratio 4:5               around a focal point
      cropper-engine crop phone/ --ratio 4:5 --out crops/   HEIC / AVIF photos too, their crops as JPEG
    Writes OUT/crops/..., OUT/results.jsonl (one line per image and ratio) and, for images that
    could not be read, OUT/errors.jsonl; the exit status is 1 if any image failed.
    """
    from tqdm import tqdm

    from cropper_engine.batch import count_inputs, run_batch
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.errors import InputError
    from cropper_engine.types import Task

    ratios = parse_ratios(ratio_text)
    size = parse_size(size_text)
    spec = parse_subject_option(subject_text, mask, keep_faces)
    t = Task.parse(task) if task else (Task.RATIO if ratios else Task.SUBJECT if mask or spec else Task.FREE)
    if t is Task.RATIO and not ratios:
        raise InputError("--task ratio needs --ratio W:H (e.g. --ratio 4:3 or --ratio 1:1,16:9)")
    if t is not Task.RATIO and ratios:
        raise InputError(f"--ratio only applies to --task ratio (not {t.value})")
    if t is Task.SUBJECT and not mask and spec is None:
        raise InputError("--task subject needs --mask PATH (a white-on-black subject mask) or --subject "
                         "auto | face | person | saliency | X,Y | X1,Y1,X2,Y2")
    if t is Task.FREE and spec is not None:
        raise InputError("--subject applies to the subject task, or with --ratio to every ratio's crop; "
                         "not to --task free (--keep-faces does)")
    if t is Task.FREE and mask:
        raise InputError("--mask applies to the subject task, or with --ratio to every ratio's crop (the "
                         "subject kept inside); not to --task free")
    if out_dir is not None and not out_dir.strip():
        raise InputError("--out '' names no folder: give one (e.g. --out crops/), or leave --out out to print "
                         "the results only")
    if size and not out_dir:
        raise InputError("--size needs --out DIR: it resizes the crops written to DIR/crops/ (without --out "
                         "only the boxes are printed)")
    fmt = None if crop_format == "auto" else crop_format
    if fmt and not out_dir:
        raise InputError(f"--format {fmt} needs --out DIR: it is the format of the crops written to DIR/crops/ "
                         "(without --out only the boxes are printed)")
    limit = max_pixels or load_cfg(ctx).max_pixels  # the flag, else the config's (file, environment)
    if mask:
        precheck_mask(mask, inputs, out_dir, limit)
    precheck_subject(spec, inputs, out_dir, limit)
    if report and not out_dir:
        raise InputError("--report needs --out DIR (the report is written to DIR/report/)")
    if resume and not out_dir:
        raise InputError("--resume needs --out DIR (it reads DIR/results.jsonl)")
    if save_prompts and not out_dir:
        raise InputError("--save-prompts needs --out DIR (the prompts are written to DIR/prompts/)")
    if out_dir:  # an unwritable --out is refused before any work
        from cropper_engine.batch import check_out_dir

        check_out_dir(out_dir)
        from cropper_engine.batch import check_out_format

        check_out_format(fmt)
    cfg = load_cfg(ctx, **{"index": index_dir, "vlm.model": vlm, "vlm.backend": backend,
                           "vlm.batch_size": batch_size, "vlm.candidates": candidates,
                           "vlm.rounds": rounds, "retrieval.examples": examples, "max_pixels": max_pixels})
    cropper = Cropper.from_config(cfg)
    info = cropper.describe()
    click.echo(f"pipeline: {info['reasons'].get('pipeline', info['pipeline'])}", err=True)
    for key in ("embedder", "index", "scorer", "zero_shot"):
        if key in info["reasons"]:
            click.echo(f"{key}: {info['reasons'][key]}", err=True)
    if save_prompts and cropper.vlm is None:
        click.echo("--save-prompts: no VLM in this run (pipeline no-vlm), so there are no prompts to save", err=True)
    rep = None
    if report:
        from pathlib import Path

        from cropper_engine.report import HtmlReport

        rep = HtmlReport(Path(out_dir) / "report", resume=resume)  # type: ignore[arg-type]

    def emit(row: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(row))
        elif not out_dir:
            click.echo(f"{row['image']}\t{row['ratio'] or row['task']}\t{row['box']}\t"
                       f"score {row['score']:.3f}\t{row['pipeline']}")

    total = count_inputs(inputs, out_dir)
    with tqdm(total=total, desc="crop", unit="img", file=sys.stderr, disable=None) as bar:
        summary = run_batch(
            cropper, inputs, task=t, ratios=ratios, mask=mask, out_dir=out_dir, size=size,
            resume=resume, batch_size=cfg.vlm.batch_size, emit=emit, subject=spec, keep_faces=keep_faces,
            on_error=lambda msg: tqdm.write(f"error: {msg}", file=sys.stderr),
            on_note=lambda msg: tqdm.write(f"note: {msg}", file=sys.stderr),
            on_progress=bar.update, report=rep, save_prompts=save_prompts, crop_format=fmt,
        )
    cropper.close()
    failed = bool(summary.errors)
    if rep is not None:
        try:
            page = rep.close()
            click.echo(f"report: {page}", err=True)
        except OSError as exc:
            from cropper_engine.batch import os_problem

            click.echo(f"error: cannot finish the report in {out_dir}/report ({os_problem(exc)}); the crops and "
                       "results.jsonl are written; run the same command with --resume --report to write it again",
                       err=True)
            failed = True
    if summary.not_read:
        where = f" (each with why in {out_dir}/skipped.jsonl)" if out_dir else ""
        n = len(summary.not_read)
        click.echo(f"not read: {n} file{'s' if n > 1 else ''} of the folders{where}:", err=True)
        for line in summarise_skipped([f"{path}: {why}" for path, why in summary.not_read]):
            click.echo(f"  {line}", err=True)
    pipes = ", ".join(f"{k} {v}" for k, v in summary.pipelines.items()) or "-"
    click.echo(f"{summary.images} images, {summary.results} crops ({pipes}), {summary.skipped} skipped "
               f"(already done), {len(summary.not_read)} not read, {len(summary.errors)} errors"
               + (f"; results in {out_dir}/results.jsonl" if out_dir else ""), err=True)
    if summary.stopped:
        click.echo(f"stopped early: {summary.stopped}", err=True)
    if failed:
        sys.exit(1)


# --- fit --------------------------------------------------------------------------------


@main.command("fit")
@click.option("--dataset", "kind", type=click.Choice(["jsonl", "fcdb", "gaicd", "sacd", "results"]), required=True,
              help="Annotation format (jsonl: our own, see the README; results: the results.jsonl of an earlier "
                   "`crop --out` run, e.g. the VLM loop's crops of part of a collection).")
@click.option("--annotations", type=click.Path(), required=True,
              help="Annotation file (or, for gaicd text files / sacd, a directory; for results, results.jsonl).")
@click.option("--images", type=click.Path(), default=None,
              help="Image directory [default: 'images' next to the annotations].")
@click.option("--split", default=None, help="GAICD split (train|test) from original_data_split.json.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N examples.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, metavar="MODEL_DIR",
              help="The model folder to write (then: crop / eval / serve --default-model MODEL_DIR).")
@click.option("--overwrite", is_flag=True, help="Replace an existing MODEL_DIR.")
@click.option("--folds", type=click.IntRange(2, 20), default=5, show_default=True,
              help="Cross-validation folds of the report.")
@click.option("--no-mirror", is_flag=True, help="Do not add the mirror image of each training image (faster).")
@click.option("--jobs", type=click.IntRange(1, 64), default=None,
              help="Processes computing the features [default: the CPU count, at most 4].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object as the last line.")
@friendly_errors
def fit_cmd(kind: str, annotations: str, images: str | None, split: str | None, limit: int | None, out_dir: str,
            overwrite: bool, folds: int, no_mirror: bool, jobs: int | None, as_json: bool) -> None:
    """Fit the no-VLM default's ranker and retrieval table to your own crops.

    Each image's best crop is the target, for the ratio task (its own ratio given) and free-form.
    The report is cross-validated (each image held out once): IoU / Disp of the fitted model,
    of the shipped model on the same images, and of the centre baseline. Needs at least 20
    images (100 or so to beat the shipped model clearly on a consistent style of your own);
    100 images take about 1.5 minutes on 2 cores; no GPU, no weights.

    \b
    Examples:
      cropper-engine fit --dataset jsonl --annotations my_crops.jsonl --out my_model/
      cropper-engine fit --dataset results --annotations gpu_run/results.jsonl --out distilled/
      cropper-engine crop rest/ --default-model my_model/ --out crops/
    """
    import os
    import shlex
    from pathlib import Path

    from cropper_engine.fitting import check_fit_out, fit_model, read_training

    check_fit_out(out_dir, overwrite)  # an existing or unwritable MODEL_DIR is refused before the work
    examples, skipped = read_training(kind, annotations, images, split, limit)
    for line in summarise_skipped(skipped):
        click.echo(f"skipped: {line}", err=True)
    if kind == "results":
        pipes: dict[str, int] = {}
        for ex in examples:
            pipes[str(ex.extra.get("pipeline"))] = pipes.get(str(ex.extra.get("pipeline")), 0) + 1
        click.echo("crops by pipeline: " + ", ".join(f"{k} {v}" for k, v in pipes.items()), err=True)
    n_jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    source = {"dataset": kind, "annotations": str(Path(annotations).resolve()),
              "images": str(Path(images).resolve()) if images else None, "split": split,
              "command": shlex.join(["cropper-engine", "fit", "--dataset", kind, "--annotations", annotations,
                                     *(["--images", images] if images else []), *(["--split", split] if split else []),
                                     *(["--limit", str(limit)] if limit else []), "--out", out_dir,
                                     *(["--folds", str(folds)] if folds != 5 else []),
                                     *(["--no-mirror"] if no_mirror else [])])}
    n_images = len({os.path.realpath(ex.image_path) for ex in examples})
    click.echo(f"fitting on {len(examples)} examples of {n_images} images ({n_jobs} processes)", err=True)
    with sigterm_as_interrupt():
        report = fit_model(examples, out_dir, folds=folds, mirror=not no_mirror, jobs=n_jobs, overwrite=overwrite,
                           progress=True, log=lambda m: click.echo(m, err=True), source=source, skipped=skipped)
    click.echo(report.table())
    click.echo(f"wrote {report.out} ({report.images} images, {report.seconds:.0f} s); use it with: "
               f"cropper-engine crop ... --default-model {report.out}")
    if as_json:
        click.echo(json.dumps(report.to_json()))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside: `kill PID` (SIGTERM) ends the command as Ctrl-C does, through its clean-up (a fit's
    temporary folder is removed), instead of at once. The handler before is put back after."""
    import signal
    import threading

    def stop(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


# --- index ------------------------------------------------------------------------------


@main.group()
def index() -> None:
    """Build, extend and inspect an on-disk example index (CLIP or classical embeddings)."""


def embedder_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--embedder", default=None,
        help="auto | classical | open_clip:MODEL[:TAG|:FILE] | open_clip-dir:DIR | hf-clip:ID|DIR "
             "[default: auto = open_clip ViT-B-32 if its weights are here, else classical].",
    )(fn)


def get_embedder(cfg: Any, spec: str | None, quiet: bool = False) -> Any:
    from cropper_engine.models.embedders import resolve_embedder

    emb, reason = resolve_embedder(spec or cfg.retrieval.embedder)
    if not quiet:
        click.echo(f"embedder: {emb.id} ({reason})", err=True)
    return emb


def subjects_option(default: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    more = "" if default else " [default: the index's own, else auto]"
    return click.option(
        "--subjects", "subjects", type=click.Choice(["auto", "none"]), default=default, show_default=bool(default),
        help="Subject boxes for examples whose dataset has no mask (no mask file, no box): auto gives each "
             "the automatic subject of `crop --subject auto` (faces, else persons, else the salient region) "
             "and one subject box per crop, for the subject task; none leaves them without." + more)


def subjects_line(report: Any) -> str:
    """What the build did about subject boxes, for the closing line."""
    counts = (report.subjects or {}).get("counts") or {}
    auto = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("auto:")}
    if not auto:
        return ""
    how = ", ".join(f"{k} {v}" for k, v in sorted(auto.items()))
    return f"; automatic subject boxes: {sum(auto.values())} ({how}), {report.subjects.get('seconds', 0):.1f} s"


def skipped_count(ds: Any, report: Any) -> str:
    """'N skipped' counting records, as `eval` does: those the reader skipped and those whose
    image could not be embedded."""
    n = ds.n_skipped + len(report.skipped)
    if not n:
        return "0 skipped"
    present = sum(1 for m in report.skipped if m.endswith(ALREADY_IN_INDEX))
    unreadable = len(report.skipped) - present
    parts = [what for what in (f"{ds.n_skipped} in the annotations" if ds.n_skipped else "",
                               f"{present} already in the index" if present else "",
                               f"{unreadable} unreadable images" if unreadable else "") if what]
    return f"{n} skipped ({', '.join(parts)})"


# how index/embed.py's _embed_examples names an example whose id the index (or this set) holds already
ALREADY_IN_INDEX = "duplicate example id (already in the index), skipped"


@index.command("build")
@dataset_options
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Index directory to write.")
@embedder_option
@click.option("--overwrite", is_flag=True, help="Replace an existing index at --out.")
@click.option("--m", "M", type=click.IntRange(4, 128), default=None, help="HNSW graph degree M.")
@click.option("--ef-construction", type=click.IntRange(8, 2000), default=None)
@subjects_option("auto")
@click.pass_context
@friendly_errors
def index_build(ctx: click.Context, kind: str, annotations: str, images: str | None, split: str | None,
                limit: int | None, out_dir: str, embedder: str | None, overwrite: bool,
                M: int | None, ef_construction: int | None, subjects: str) -> None:
    """Embed a dataset's images and write an example index (atomically) to --out.

    Every example gets a subject box (the subject task's): from its mask file, else the box its
    dataset gives, else (--subjects auto) the automatic subject of `crop --subject auto`."""
    from pathlib import Path

    from cropper_engine.batch import check_new_dir
    from cropper_engine.errors import ExampleIndexError
    from cropper_engine.index.store import ExampleIndex

    cfg = load_cfg(ctx)
    if Path(out_dir).exists() and not overwrite:
        raise ExampleIndexError(f"{out_dir} already exists; pass --overwrite to replace it")
    check_new_dir(out_dir, "--out")  # an unwritable destination is refused before the work
    ds = read_examples(kind, annotations, images, split, limit)
    if not ds.examples:
        raise click.ClickException("no usable examples in the dataset (see the messages above)")
    emb = get_embedder(cfg, embedder)
    kw: dict[str, Any] = {}
    if M:
        kw["M"] = M
    if ef_construction:
        kw["ef_construction"] = ef_construction
    report = ExampleIndex.build(
        ds.examples, emb, out_dir, overwrite=overwrite, progress=True,
        source={"dataset": kind, "annotations": str(Path(annotations).resolve()),
                "images": str(Path(images).resolve()) if images else None, "split": split},
        subjects=subjects, **kw,
    )
    for line in summarise_skipped(report.skipped):
        click.echo(f"skipped: {line}", err=True)
    click.echo(f"wrote {out_dir}: {report.count} examples, {skipped_count(ds, report)}, {report.seconds:.1f} s"
               f"{subjects_line(report)}")


@index.command("add")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@dataset_options
@embedder_option
@subjects_option(None)
@click.pass_context
@friendly_errors
def index_add(ctx: click.Context, index_dir: str, kind: str, annotations: str, images: str | None,
              split: str | None, limit: int | None, embedder: str | None, subjects: str | None) -> None:
    """Append a dataset's examples to an existing index (same embedder)."""
    from cropper_engine.index.store import ExampleIndex

    cfg = load_cfg(ctx)
    idx = ExampleIndex.load(index_dir)
    spec = embedder or idx.embedder_spec() or cfg.retrieval.embedder
    emb = get_embedder(cfg, spec)
    ds = read_examples(kind, annotations, images, split, limit)
    idx = ExampleIndex.load(index_dir, embedder=emb)
    report = idx.add(ds.examples, emb, progress=True, subjects=subjects)
    for line in summarise_skipped(report.skipped):
        click.echo(f"skipped: {line}", err=True)
    click.echo(f"added {report.count} examples to {index_dir} ({skipped_count(ds, report)}{subjects_line(report)})")


@index.command("info")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def index_info(index_dir: str, as_json: bool) -> None:
    """Describe an index: embedder, size, graph parameters, source, subject boxes (how many
    examples have one, from where); checks its files' checksums."""
    from cropper_engine.index.store import ExampleIndex
    from cropper_engine.index.subjects import subjects_summary

    idx = ExampleIndex.load(index_dir)
    idx.verify()
    info = idx.info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    info["subjects"] = subjects_summary(info)
    for key, value in info.items():
        if key == "additions" and isinstance(value, list):
            value = "; ".join(f"{a.get('time')}: {a.get('count')} examples" for a in value if isinstance(a, dict))
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:>16}: {value}")


@index.command("query")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("image", type=click.Path())
@click.option("-k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--exact", is_flag=True, help="Brute-force search instead of the HNSW graph.")
@embedder_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly_errors
def index_query(ctx: click.Context, index_dir: str, image: str, k: int, exact: bool,
                embedder: str | None, as_json: bool) -> None:
    """Print an image's k nearest examples with their cosine similarities."""
    from cropper_engine.imageio import open_image
    from cropper_engine.index.store import ExampleIndex

    cfg = load_cfg(ctx)
    idx = ExampleIndex.load(index_dir)
    emb = get_embedder(cfg, embedder or idx.embedder_spec(), quiet=as_json)
    idx = ExampleIndex.load(index_dir, embedder=emb)
    vec = emb.embed([open_image(image, cfg.max_pixels).image])
    hits = idx.query(vec, k, exact=True if exact else None)[0]
    if as_json:
        click.echo(json.dumps([{"row": h.row, "id": h.id, "similarity": round(h.similarity, 5)}
                               for h in hits]))
        return
    for rank, h in enumerate(hits, 1):
        click.echo(f"{rank:>4}  {h.similarity:.4f}  {h.id}")


# --- models -----------------------------------------------------------------------------


@main.group()
def models() -> None:
    """Known VLMs, and tiny random models for tests and CPU benchmarks."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="The VLM registry as JSON (with --fitted: the default models).")
@click.option("--fitted", "only_fitted", is_flag=True,
              help="Only the no-VLM default's models: the shipped one and those `cropper-engine fit` wrote.")
@click.pass_context
@friendly_errors
def models_list(ctx: click.Context, as_json: bool, only_fitted: bool) -> None:
    """The model registry: hub id and pinned revision, context, the processor settings the
    engine uses, tokens per image (measured from the processor where its files are here), whether
    each model's weights are in the local HF cache, and the no-VLM default's models: the shipped
    one and those fitted here by `cropper-engine fit`."""
    from cropper_engine.models.registry import hf_cache_dir, list_models

    rows = list_models()
    fitted = fitted_models(ctx)
    if as_json:
        click.echo(json.dumps(fitted if only_fitted else rows, indent=2))
        return
    if not only_fitted:
        click.echo(f"{'name':<20} {'hub id':<34} {'revision':<12} {'params':>6} {'context':>7} {'img tok':>7}  "
                   f"{'local':<5}  processor settings")
        for r in rows:
            star = "*" if r["default"] else " "
            rev = str(r["revision"])[:10] if r["revision"] else "-"
            tokens = r["image_tokens"] if r["image_tokens"] is not None else "-"
            settings = ", ".join(f"{k}={v}" for k, v in r["processor_settings"].items())  # type: ignore[union-attr]
            click.echo(f"{star}{r['name']:<19} {r['hub_id']:<34} {rev:<12} {r['params_b']:>5}B {r['context']:>7} "
                       f"{tokens:>7}  {'yes' if r['local'] else 'no':<5}  {settings}")
        click.echo(f"(* default; weights looked up in {hf_cache_dir()}; any local model folder works with --vlm "
                   "PATH; img tok: measured from the processor at these settings when its files are here; "
                   "revision -: not pinned, --json says why)")
        click.echo("")
    star = "*" if not fitted["default_model"] else " "
    click.echo("no-VLM default models (--default-model DIR):")
    click.echo(f"{star}shipped (FCDB train, {fitted['shipped_images']} images)")
    for r in fitted["fitted"]:
        star = "*" if r["path"] == fitted["default_model"] else " "
        if not r["present"]:
            click.echo(f"{star}{r['path']}  (gone)")
            continue
        cv = "; ".join(f"{t} IoU {c['iou']:.3f} vs shipped {c['shipped_iou']:.3f}" for t, c in r.get("cv", {}).items()
                       if c.get("iou") is not None and c.get("shipped_iou") is not None)
        click.echo(f"{star}{r['path']}  ({r.get('dataset')}, {r.get('images')} images, {r.get('created')}; CV {cv})")
    from cropper_engine.models.fitted import list_path

    click.echo(f"(* in use; fitted models listed in {list_path()})")


def fitted_models(ctx: click.Context) -> dict[str, Any]:
    """The shipped default model and the fitted ones (models/fitted.py), with the configured one."""
    from pathlib import Path

    from cropper_engine.errors import ConfigError
    from cropper_engine.models.default_model import default_model
    from cropper_engine.models.fitted import known_models

    try:
        configured = load_cfg(ctx).default_model
    except ConfigError:  # a bad config is reported by the commands that use it, not by a listing
        configured = ""
    current = str(Path(configured).expanduser().resolve()) if configured else ""
    shipped = default_model()
    images = shipped.meta.get("trained_on", {}).get("images") if shipped is not None else None
    return {"default_model": current, "shipped_images": images,
            "fitted": known_models([current] if current else [])}


@models.command("make-tiny")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--like", "like", default=None, metavar="NAME",
              help="Build a tiny model that behaves like the registry model NAME (see `models list`) in "
                   "OUT/NAME: its tokenizer rules, special tokens, chat template, processor settings, tokens "
                   "per image, rope, context and sliding window; only the sizes shrink.")
@click.option("--overwrite", is_flag=True, help="Replace models already in OUT (OUT/idefics2, OUT/clip, OUT/NAME).")
@friendly_errors
def models_make_tiny(out_dir: str, like: str | None, overwrite: bool) -> None:
    """Build tiny random models offline (seconds): OUT/idefics2 (a VLM) and OUT/clip (CLIP).

    With --like NAME, OUT/NAME instead: a tiny random model that keeps everything of the real
    model's config but its sizes (tested against models/sheets/NAME.json), e.g.
    `make-tiny tiny/ --like mantis-8b-idefics2`, then `crop ... --vlm tiny/mantis-8b-idefics2`.

    They crop nothing well: they exercise the real code paths in tests and CPU benchmarks.
    A model already in OUT is refused unless --overwrite.
    """
    import shutil
    from pathlib import Path

    from cropper_engine.batch import check_out_dir
    from cropper_engine.errors import InputError

    out = Path(out_dir)
    name = like.lower() if like is not None else None
    if like is not None:
        from cropper_engine.models.tiny_vlm import LIKE_NAMES

        if name not in LIKE_NAMES:
            raise click.BadParameter(f"unknown model {like!r}; one of: {', '.join(LIKE_NAMES)}", param_hint="--like")
    targets = [out / name] if name is not None else [out / "idefics2", out / "clip"]
    there = [t for t in targets if t.exists() or t.is_symlink()]
    if there and not overwrite:
        raise InputError(f"{', '.join(str(t) for t in there)} already exist{'s' if len(there) == 1 else ''}; "
                         f"pass --overwrite to replace {'it' if len(there) == 1 else 'them'}, or choose another folder")
    check_out_dir(out, "OUT")  # an unwritable folder is refused before the work
    for t in there:  # --overwrite: the old model goes, none of its files stay among the new ones
        if t.is_dir() and not t.is_symlink():
            shutil.rmtree(t)
        else:
            t.unlink()
    if name is not None:
        from cropper_engine.models.tiny_vlm import make_tiny_like

        vlm = make_tiny_like(out / name, name)
        click.echo(f"tiny VLM like {name}: {vlm}   (use: --vlm {vlm} --backend transformers)")
        return

    from cropper_engine.models.tiny import make_tiny_clip
    from cropper_engine.models.tiny_vlm import make_tiny_idefics2

    vlm = make_tiny_idefics2(out / "idefics2")
    clip = make_tiny_clip(out / "clip")
    click.echo(f"tiny VLM:  {vlm}   (use: --vlm {vlm} --backend transformers)")
    for kind, path in clip.items():
        click.echo(f"tiny CLIP: {path}   ({kind})")


# --- serve ------------------------------------------------------------------------------


@main.command("serve")
@default_model_option
@click.option("--host", default=None, help="Address to bind [default: 127.0.0.1]; any other needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port [default: 8000].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A TOML config file (its [server] table: limits, batching, api_key).")
@click.option("--index", "index_dir", type=click.Path(), default=None, help="Example index directory.")
@click.option("--vlm", default=None, help="auto [default] | none | a model name or local folder.")
@click.option("--backend", default=None, help="VLM backend: auto | transformers | vllm | openai.")
@click.option("--vlm-url", default=None,
              help="The OpenAI-compatible server of the openai backend, e.g. http://127.0.0.1:8001/v1.")
@click.option("--api-key", default=None,
              help="Require 'Authorization: Bearer KEY' (better: CROPPER_SERVER_API_KEY, not shown by ps).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=None, help="Requests per engine batch [8].")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 1000), default=None,
              help="How long an idle engine waits to fill a batch [5].")
@click.option("--queue-size", type=click.IntRange(1, 100_000), default=None,
              help="Requests waiting at most; beyond, 503 with Retry-After [64].")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=None,
              help="Seconds a request may take before a 504 [120].")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.01), default=None, help="Upload limit [25].")
@max_pixels_option
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU threads for the engine's torch ops [torch's default: one per core]; 1 is steadier "
                   "on a machine shared with other busy processes.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_context
@friendly_errors
def serve_cmd(ctx: click.Context, host: str | None, port: int | None, config_file: str | None,
              index_dir: str | None, vlm: str | None, backend: str | None, vlm_url: str | None,
              api_key: str | None, max_batch: int | None, batch_wait_ms: float | None, queue_size: int | None,
              timeout_s: float | None, max_upload_mb: float | None, max_pixels: int | None, threads: int | None,
              log_level: str) -> None:
    """Serve the engine over HTTP: POST /v1/crop, a page to try it at /, /docs, /metrics.

    \b
    Examples:
      cropper-engine serve                                   the default pipeline on 127.0.0.1:8000
      cropper-engine serve --vlm tiny/idefics2 --backend transformers
      cropper-engine serve --backend openai --vlm-url http://gpu-box:8001/v1
      CROPPER_SERVER_API_KEY=secret cropper-engine serve --host 0.0.0.0
      curl -F image=@photo.jpg -F ratio=16:9 http://127.0.0.1:8000/v1/crop
    """
    import logging
    import os

    import uvicorn

    from cropper_engine.server import create_app, header_timeout_protocol, return_freed_memory

    if threads:  # read by torch when the engine loads it
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if config_file:
        ctx.obj["config"] = config_file
    cfg = load_cfg(ctx, **{
        "index": index_dir, "vlm.model": vlm, "vlm.backend": backend, "vlm.base_url": vlm_url,
        "server.host": host, "server.port": port, "server.api_key": api_key, "server.max_batch": max_batch,
        "server.batch_wait_ms": batch_wait_ms, "server.queue_size": queue_size,
        "server.request_timeout_s": timeout_s, "server.max_upload_mb": max_upload_mb, "max_pixels": max_pixels})
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(cfg)
    return_freed_memory()
    s = cfg.server
    click.echo(f"serving on http://{s.host}:{s.port}/ (API key {'required' if s.api_key else 'not required'}; "
               f"batches of up to {s.max_batch}, queue {s.queue_size})", err=True)
    try:
        uvicorn.run(app, host=s.host, port=s.port, log_level=log_level, timeout_graceful_shutdown=10,
                    server_header=False, http=header_timeout_protocol(s.header_timeout_s, s.send_timeout_s))
    except SystemExit:
        if not getattr(app.state, "startup_error", None):
            raise
    err = getattr(app.state, "startup_error", None)
    if err:
        raise click.ClickException(f"the engine could not be loaded: {err}")


def run() -> None:
    main(prog_name="cropper-engine")


if __name__ == "__main__":
    run()
