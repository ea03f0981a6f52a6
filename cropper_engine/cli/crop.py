"""`cropper-engine crop`: crop images, folders and manifests.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from cropper_engine.cli.inputs import parse_ratios, parse_size, parse_subject_option, precheck_mask, precheck_subject
from cropper_engine.cli.options import (
    default_model_option,
    friendly_errors,
    load_cfg,
    max_pixels_option,
    subject_options,
    summarise_skipped,
)


@click.command("crop")
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

