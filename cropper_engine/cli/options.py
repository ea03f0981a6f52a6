"""Shared plumbing of the commands: CropperError -> a one-line message, the config, the
options several commands take, reading a dataset, the embedder.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
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


def dataset_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--dataset", "kind", type=click.Choice(DATASET_KINDS), required=True,
                     help="Annotation format (jsonl: our own format, see docs/indexes.md)."),
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


def max_pixels_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--max-pixels", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Refuse images of more pixels than this, before decoding [120000000; "
                             "max_pixels in the config, CROPPER_MAX_PIXELS].")(fn)


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

