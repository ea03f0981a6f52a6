"""`cropper-engine index`: build, extend, describe and query an example index.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from cropper_engine.cli.options import (
    dataset_options,
    embedder_option,
    friendly_errors,
    get_embedder,
    load_cfg,
    read_examples,
    summarise_skipped,
)


@click.group()
def index() -> None:
    """Build, extend and inspect an on-disk example index (CLIP or classical embeddings)."""


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

