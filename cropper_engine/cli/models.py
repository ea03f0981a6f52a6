"""`cropper-engine models`: the VLM registry and the no-VLM default's models, and tiny random
models for tests and CPU benchmarks.
"""

from __future__ import annotations

import json
from typing import Any

import click

from cropper_engine.cli.options import friendly_errors, load_cfg


@click.group()
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

