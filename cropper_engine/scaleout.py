"""Cropping millions of images on several GPUs or machines with Ray Data.

    python -m cropper_engine.scaleout MANIFEST --out DIR [--actors 4] [--gpus-per-actor 1]
                                      [--address auto] [--config FILE] [--task ratio --ratio 1:1]

MANIFEST is a .txt (one image path a line) or .jsonl ({"image", "ratio"?, "mask"?, "task"?}
a line) that every node can read, with image paths every node can read (a shared file system or
object store mount). The dataset is streamed through `map_batches` into a pool of actors, one
engine (one `Cropper`, one VLM) per actor and per GPU; each block of results is written as a
JSON-lines file under DIR/results/ as soon as it is done, and the crops under DIR/crops/. Run it
again after an interruption: images already in DIR/results/ are skipped (resumable). Bad images
get an `error` row (and are retried on the next run), they never stop the job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from cropper_engine.errors import CropperError


def _read_manifest(manifest: str) -> list[dict[str, Any]]:
    """Rows {"image", "ratio", "mask", "task"} from a .txt or .jsonl manifest (paths made absolute)."""
    base = Path(manifest).resolve().parent
    rows = []
    with open(manifest) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            d = json.loads(line) if manifest.endswith(".jsonl") else {"image": line}
            img = str(d["image"])
            d["image"] = img if os.path.isabs(img) else str(base / img)
            if isinstance(d.get("ratio"), list):
                d["ratio"] = ",".join(d["ratio"])
            rows.append({"image": d["image"], "ratio": d.get("ratio") or "", "mask": d.get("mask") or "",
                         "task": d.get("task") or "", "subject": d.get("subject") or ""})
    return rows


def done_images(out_dir: str | Path) -> set[str]:
    """Images that already have a result row (not an error) under out_dir/results/."""
    done: set[str] = set()
    res = Path(out_dir) / "results"
    if not res.is_dir():
        return done
    for f in res.glob("*.json*"):
        with f.open() as fh:
            for line in fh:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a torn line from an interrupted write
                if not d.get("error"):
                    done.add(d.get("source") or d.get("image"))
    return done


class CropActor:
    """One engine per actor (and per GPU); called with batches of manifest rows."""

    def __init__(self, config_file: str | None, overrides: dict[str, Any], out_dir: str, task: str,
                 ratios: str) -> None:
        from cropper_engine.batch import OutputWriter
        from cropper_engine.config import load_config
        from cropper_engine.engine.loop import Cropper

        self.cropper = Cropper.from_config(load_config(config_file, overrides=overrides))
        self.writer = OutputWriter(Path(out_dir))
        self.task, self.ratios = task, ratios

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from cropper_engine.batch import InputItem
        from cropper_engine.types import CropRequest, Ratio, Task

        reqs, errors = [], {}
        for i, img in enumerate(batch["image"]):
            try:
                task = Task.parse(batch["task"][i] or self.task)
                ratio_text = batch["ratio"][i] or self.ratios
                ratios = [Ratio.parse(r) for r in ratio_text.split(",") if r] if task is Task.RATIO else []
                subject = batch["subject"][i] or None
                if subject and task is Task.FREE:
                    task = Task.SUBJECT
                reqs.append((i, CropRequest(img, task, ratios, batch["mask"][i] or None, id=Path(img).name,
                                            subject=subject)))
            except CropperError as exc:
                errors[i] = str(exc)
        outs = self.cropper.crop_batch([r for _, r in reqs]) if reqs else []
        rows: list[dict[str, Any]] = []
        for (i, _req), out in zip(reqs, outs, strict=True):
            src = batch["image"][i]
            if isinstance(out, CropperError):
                errors[i] = str(out)
                continue
            for r in out:
                row = r.to_json()
                row["source"] = src
                try:
                    rel = Path(src).name if not os.path.isabs(src) else os.path.relpath(src, "/")
                    item = InputItem(src, rel)
                    row["output"] = str(self.writer.write(item, r, r.loaded.image, r.loaded.icc_profile))
                except OSError as exc:
                    row["error"] = f"cannot write the crop ({exc})"
                rows.append(row)
        for i, msg in errors.items():
            rows.append({"source": batch["image"][i], "image": batch["image"][i], "error": msg})
        # one column of JSON text per row: blocks stay simple whatever the nesting
        return {"source": [r["source"] for r in rows], "json": [json.dumps(r) for r in rows]}


def run(manifest: str, out_dir: str, *, actors: int = 1, gpus_per_actor: float = 0.0, batch_size: int = 8,
        config_file: str | None = None, overrides: dict[str, Any] | None = None, task: str = "free",
        ratios: str = "", address: str | None = None) -> dict[str, int]:
    """Crop every image of `manifest` not yet done; returns counts (done before, new rows, errors)."""
    import ray

    out = Path(out_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    rows = _read_manifest(manifest)
    done = done_images(out)
    todo = [r for r in rows if r["image"] not in done]
    counts = {"manifest": len(rows), "already_done": len(rows) - len(todo), "rows": 0, "errors": 0}
    if not todo:
        return counts
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    ds = ray.data.from_items(todo)
    results = ds.map_batches(
        CropActor,
        fn_constructor_kwargs={"config_file": config_file, "overrides": overrides or {}, "out_dir": str(out),
                               "task": task, "ratios": ratios},
        batch_size=batch_size, concurrency=actors, num_gpus=gpus_per_actor, batch_format="numpy",
    )
    # each finished block is written as it completes; a rerun skips what these files hold
    run_id = uuid.uuid4().hex[:12]
    for k, block in enumerate(results.iter_batches(batch_size=None, batch_format="numpy")):
        name = f"part-{run_id}-{k:06d}.jsonl"
        tmp = out / "results" / (name + ".part")
        with tmp.open("w") as fh:
            for line in block["json"]:
                fh.write(str(line) + "\n")
                counts["errors" if '"error"' in str(line) else "rows"] += 1
        os.replace(tmp, out / "results" / name)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("--out", required=True)
    ap.add_argument("--actors", type=int, default=1, help="engines in the pool (one per GPU)")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--config", default=None)
    ap.add_argument("--vlm", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--index", default=None)
    ap.add_argument("--task", default="free")
    ap.add_argument("--ratio", default="")
    ap.add_argument("--address", default=None, help="a Ray cluster address (default: a local one)")
    a = ap.parse_args(argv)
    over = {k: v for k, v in {"vlm.model": a.vlm, "vlm.backend": a.backend, "index": a.index}.items() if v}
    counts = run(a.manifest, a.out, actors=a.actors, gpus_per_actor=a.gpus_per_actor, batch_size=a.batch_size,
                 config_file=a.config, overrides=over, task=a.task, ratios=a.ratio, address=a.address)
    print(json.dumps(counts))
    sys.exit(1 if counts["errors"] else 0)


if __name__ == "__main__":
    main()
