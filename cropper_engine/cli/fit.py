"""`cropper-engine fit`: fit the no-VLM default to your own crops.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import click

from cropper_engine.cli.options import friendly_errors, summarise_skipped


@click.command("fit")
@click.option("--dataset", "kind", type=click.Choice(["jsonl", "fcdb", "gaicd", "sacd", "results"]), required=True,
              help="Annotation format (jsonl: our own, see docs/indexes.md; results: the results.jsonl of an earlier "
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

