"""`cropper-engine eval`: a cropping method over an annotated dataset, and its summary.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from cropper_engine.cli.inputs import parse_subject_option
from cropper_engine.cli.options import (
    dataset_options,
    default_model_option,
    friendly_errors,
    load_cfg,
    read_examples,
    subject_options,
)


@click.command("eval")
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

