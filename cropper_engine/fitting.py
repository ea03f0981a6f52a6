"""Fit the no-VLM default to your own crops: `cropper-engine fit` (and `fit_model` from Python).

    cropper-engine fit --dataset jsonl --annotations my_crops.jsonl --out my_model/
    cropper-engine crop shoot/ --default-model my_model/ --out crops/

The same recipe as the shipped model (engine/fit_default.py, fitted once on FCDB), on any
dataset the readers take, or on the results.jsonl of an earlier `crop` run (`--dataset results`:
distil the VLM loop's crops of part of a collection into the CPU default for the rest):

1. a retrieval table of the training images (classical descriptors and their best crops, no
   images), the model's own, used at crop time in place of the built-in FCDB table;
2. for every image (and its mirror image): its nearest neighbours in that table leave-one-out,
   the image analysis, the dense candidates, their features and their IoU with the image's best
   crop, for the ratio task (the crop's own ratio given) and the free-form task;
3. k-fold cross-validation grouped by image: the fitted model's IoU / Disp on each held-out fold,
   beside the shipped model's on the same images (with the built-in table, never retrieving the
   image itself) and the centre baseline; the blend temperature is picked there;
4. one LambdaRank model per task on all images, written with the table to the output folder
   (models/fitted.py), atomically.

Needs LightGBM (`pip install 'cropper-engine[fit]'`, installed by `make install`); running the
fitted model needs numpy only. No GPU, no weights.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.data.example import Example
from cropper_engine.errors import AnnotationError, BackendUnavailableError, InputError

MIN_IMAGES = 20  # distinct images: fewer cannot be cross-validated in 5 folds nor fitted (refused with a message)
FOLDS = 5
DATASET_KINDS = ("jsonl", "fcdb", "gaicd", "sacd", "results")


@dataclass
class FitReport:
    """What a fit did: the folder, the images, and per task the cross-validated figures."""

    out: str
    images: int
    skipped: list[str] = field(default_factory=list)
    cv: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        """The report as a small text table (what `cropper-engine fit` prints)."""
        lines = [f"{'task':<6} {'fitted IoU':>10} {'Disp':>6}   {'shipped IoU':>11} {'Disp':>6}   "
                 f"{'centre IoU':>10}   images"]
        for task, c in self.cv.items():
            nan = float("nan")
            lines.append(f"{task:<6} {c['iou']:>10.3f} {c['disp']:>6.3f}   {c.get('shipped_iou', nan):>11.3f} "
                         f"{c.get('shipped_disp', nan):>6.3f}   {c['baseline_iou']:>10.3f}   {c['images']}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"out": self.out, "images": self.images, "skipped": len(self.skipped), "cv": self.cv,
                "seconds": round(self.seconds, 1)}


# --- reading the training data --------------------------------------------------------------


def read_results(path: str | os.PathLike[str]) -> tuple[list[Example], list[str]]:
    """Examples from a results.jsonl of `cropper-engine crop`: one per row (image and ratio), the
    chosen box as its crop. Rows whose image is gone or whose box is bad are skipped with a reason."""
    from cropper_engine.types import Box

    p = Path(path)
    if not p.is_file():
        raise AnnotationError(f"results file {p} not found (it is OUT/results.jsonl of a `cropper-engine crop "
                              "--out OUT` run)")
    examples: list[Example] = []
    skipped: list[str] = []
    with p.open(encoding="utf-8", errors="surrogateescape") as fh:  # a name not in UTF-8: its bytes
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                image, (x1, y1, x2, y2) = str(d["image"]), (float(v) for v in d["box"])
                w, h = int(d["width"]), int(d["height"])
            except (ValueError, KeyError, TypeError):
                skipped.append(f"{p}:{n}: not a results line (needs image, box, width, height)")
                continue
            if not Path(image).is_file():
                skipped.append(f"{p}:{n}: image {image} not found")
                continue
            box = Box(x1, y1, x2, y2).clamp(w, h)
            if not box.is_valid() or box.width < 2 or box.height < 2:
                skipped.append(f"{p}:{n}: box {d['box']} is empty in a {w}x{h} image")
                continue
            ratio = d.get("ratio")
            examples.append(Example(f"{Path(image).name}#{ratio or d.get('task', 'free')}#{n}", image, w, h, [box],
                                    extra={"pipeline": d.get("pipeline")}))
    return examples, skipped


def read_training(kind: str, annotations: str, images: str | None = None, split: str | None = None,
                  limit: int | None = None) -> tuple[list[Example], list[str]]:
    """The examples to fit on, and the messages for what was skipped."""
    k = kind.strip().lower()
    if k not in DATASET_KINDS:
        raise InputError(f"unknown dataset kind {kind!r}; choose one of: {', '.join(DATASET_KINDS)}")
    if k == "results":
        examples, skipped = read_results(annotations)
        return (examples[:limit] if limit else examples), skipped
    from cropper_engine.data.readers import read_dataset

    ds = read_dataset(k, annotations, images, split=split, limit=limit)
    return list(ds.examples), list(ds.skipped)


# --- features ------------------------------------------------------------------------------

_CTX: dict[str, Any] = {}  # what _image_rows reads: set in this process, and by _init_worker in each worker


def _init_worker(table_dir: str, mirror: bool) -> None:
    """A spawned worker's _CTX: the same embedder, fitting table, built-in table and shipped model
    as the parent's (spawned, not forked: a parent with threads can deadlock a forked child)."""
    from cropper_engine.index.builtin import _load as load_table_dir
    from cropper_engine.index.builtin import load_table
    from cropper_engine.models.classical import CLASSICAL_ID, ClassicalEmbedder
    from cropper_engine.models.default_model import default_model

    _CTX.update(embedder=ClassicalEmbedder(), mirror=mirror, table=load_table_dir(table_dir),
                builtin=load_table(CLASSICAL_ID), shipped=default_model())


def _image_rows(job: tuple[int, Example, set[str]]) -> dict[str, Any]:
    """One image's rows: for the image and its mirror, per task, the candidates, their features
    and IoU with the best crop (neighbours from the new table, leave-one-out); and the shipped
    model's chosen crop for the image (neighbours from the built-in table, itself excluded).
    `same`: the ids of every example of this image (a crop run's results have one per ratio):
    none of them is its neighbour."""
    from PIL import Image

    from cropper_engine.engine.analysis import analyse
    from cropper_engine.engine.default_pipeline import candidates, model_neighbours, rank
    from cropper_engine.engine.features import NEIGHBOURS_K, _iou_unit, crop_feature_dict
    from cropper_engine.engine.fit_default import keep_faces_unit
    from cropper_engine.engine.subject import detect_faces
    from cropper_engine.errors import CropperError
    from cropper_engine.imageio import open_image

    _, ex, same = job
    try:
        image = open_image(ex.image_path).image
    except CropperError as exc:
        return {"error": str(exc)}
    w, h = image.size
    if (w, h) != (ex.width, ex.height):  # the crop's pixels are the annotation's: rescale them
        crop = ex.best_crop().scale(w / ex.width, h / ex.height)
    else:
        crop = ex.best_crop()
    gt = np.array(crop.clamp(w, h).to_unit(w, h))
    ratio = (crop.width / crop.height) if crop.height > 0 else 1.0
    own = {ex.id, Path(ex.image_path).name, *same}
    emb = _CTX["embedder"]
    out: dict[str, Any] = {"gt": gt, "views": [], "key": os.path.realpath(ex.image_path)}
    views = [(image, gt)]
    if _CTX["mirror"]:
        views.append((image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), np.array([1 - gt[2], gt[1], 1 - gt[0], gt[3]])))
    for v, (img, g) in enumerate(views):
        vec = emb.embed([img])[0]
        an = analyse(img)
        nb = model_neighbours(_CTX["table"], vec, own, NEIGHBOURS_K)
        # the candidates as the engine ranks them: grown around the main faces (fit_default does the same)
        faces = detect_faces(img) if _CTX.get("faces", True) else []
        view: dict[str, Any] = {"gt": g}
        for task in ("ratio", "free"):
            r = ratio if task == "ratio" else None
            boxes, _ = candidates(an, r, nb)
            boxes = keep_faces_unit(boxes, faces, w, h, r)
            feats = crop_feature_dict(an, boxes, r, nb)
            view[task] = (boxes, feats, _iou_unit(boxes, g[None]))
        if v == 0 and _CTX["shipped"] is not None:  # the shipped model on the original image
            snb = model_neighbours(_CTX["builtin"], vec, own, NEIGHBOURS_K)
            for task in ("ratio", "free"):
                r = ratio if task == "ratio" else None
                boxes, sources = candidates(an, r, snb)
                boxes = keep_faces_unit(boxes, faces, w, h, r)
                ranked = rank(_CTX["shipped"].for_task(r is not None), an, boxes, sources, r, snb)
                out[f"shipped_{task}"] = ranked.blend_unit
        out["views"].append(view)
    return out


def _cross_validate(rows: Any, fold_of: np.ndarray, folds: int, rounds: int, log: Callable[[str], None],
                    prefix: str = "") -> np.ndarray:
    """Out-of-fold model outputs for every row: the folds are given per example (`fold_of`), the
    rest as fit_default.cross_validate (its parameters, row sampling and seed)."""
    from cropper_engine.engine import fit_default as fd

    params = {**fd.PARAMS, "seed": 0, "num_threads": 1}
    sample = np.random.default_rng(0).random(len(rows.y)) < fd.ROW_FRACTION
    fold = fold_of[rows.image]
    pred = np.zeros(len(rows.y))
    for f in range(folds):
        t0 = time.perf_counter()
        model = fd._fit(rows, (fold != f) & sample, params, rounds)
        test = fold == f
        pred[test] = model.predict(rows.x[test])
        log(f"{prefix}fold {f + 1}/{folds}: {time.perf_counter() - t0:.0f} s")
    return pred


def _build_rows(results: list[dict[str, Any]], task: str) -> Any:
    """fit_default.Rows for one task: groups 0..n-1 the originals, n..2n-1 their mirrors."""
    from cropper_engine.engine.fit_default import Rows

    n = len(results)
    views = [r["views"][0] for r in results] + [r["views"][1] for r in results if len(r["views"]) > 1]
    names = sorted(views[0][task][1])
    x = np.concatenate([np.stack([v[task][1][k] for k in names], 1) for v in views]).astype(np.float32)
    y = np.concatenate([v[task][2] for v in views])
    group = np.concatenate([np.full(len(v[task][2]), j) for j, v in enumerate(views)])
    image = (group % n) if len(views) > n else group
    boxes = np.concatenate([v[task][0] for v in views])
    gt = np.stack([v["gt"] for v in views])
    return Rows(x, y, group, image, boxes, gt, names)


def _write_table(examples: Sequence[Example], vectors: np.ndarray, out: Path, source: dict[str, Any]) -> None:
    """The model's retrieval table, in the built-in table's format (index/builtin.py): no images."""
    from cropper_engine.index.builtin import VECTORS_F16
    from cropper_engine.index.store import FORMAT_VERSION, SPACE, _embedder_info, _now

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ex in examples:
        d = ex.to_json()
        d["image"] = Path(ex.image_path).name  # never a path of this machine
        d.pop("mask", None)
        # as index/format.py's _example_line, in ASCII: a name that is not UTF-8 is kept as its \udcXX
        # escapes (read back as the same name, so leave-one-out still finds it)
        rows.append(json.dumps({"id": str(d["id"]), **{k: v for k, v in d.items() if k != "id"}}).encode("ascii"))
    manifest = {
        "format_version": FORMAT_VERSION, "embedder": _embedder_info(_CTX["embedder"]), "space": SPACE,
        "dim": int(vectors.shape[1]), "M": 0, "ef_construction": 0, "ef": 1, "count": len(examples),
        "source": source, "created": _now(), "updated": _now(), "has_images": False, "vectors": VECTORS_F16,
    }
    np.save(out / VECTORS_F16, vectors.astype(np.float16), allow_pickle=False)
    (out / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# --- the fit -----------------------------------------------------------------------------------

TMP_INFIX = ".fitting-"  # the folder a fit writes before renaming it: .NAME.fitting-PID beside NAME


def check_fit_out(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse, before any work, a model folder that exists (without `overwrite`) or whose parent
    cannot be written (the fit writes .NAME.fitting-PID beside it, then renames it)."""
    from cropper_engine.batch import check_new_dir

    out_dir = Path(out).expanduser()
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another --out")
    check_new_dir(out_dir, "--out")
    return out_dir


def remove_stale_fits(out_dir: Path) -> list[Path]:
    """Remove the temporary folders (.NAME.fitting-PID) of fits of `out_dir` that were killed: those
    whose process is gone. Returns them."""
    from cropper_engine.batch import pid_alive

    gone = []
    try:
        siblings = list(out_dir.absolute().parent.glob(f".{glob.escape(out_dir.name)}{TMP_INFIX}*"))
    except OSError:
        return gone
    for d in siblings:
        pid = d.name.rsplit(TMP_INFIX, 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def count_images(examples: Iterable[Example]) -> int:
    """Distinct images (a crop run's results have a row per ratio: one image, however many rows)."""
    return len({os.path.realpath(ex.image_path) for ex in examples})


def too_few(n_images: int, n_examples: int, what: str = "usable") -> InputError:
    rows = (f" ({n_examples} examples: the crops or ratios of one image count once)" if n_examples != n_images
            else "")
    return InputError(f"too few images to fit: {n_images} {what} image(s) with a crop{rows}, at least {MIN_IMAGES} "
                      "distinct images are needed (about 100 or more to beat the shipped model reliably on your own "
                      "style; see docs/fitting.md)")


def _mean(v: Iterable[float]) -> float:
    a = list(v)
    return round(float(np.mean(a)), 4) if a else float("nan")


def fit_model(examples: Sequence[Example], out: str | os.PathLike[str], *, folds: int = FOLDS,
              mirror: bool = True, jobs: int = 1, overwrite: bool = False, progress: bool = False,
              log: Callable[[str], None] | None = None, source: dict[str, Any] | None = None,
              skipped: Sequence[str] = (), rounds: int | None = None) -> FitReport:
    """Fit the default's ranker and table on `examples` (each image's best crop is the target),
    cross-validate it against the shipped model and write it to `out`.

    >>> from cropper_engine.data.readers import read_dataset
    >>> ds = read_dataset("jsonl", "my_crops.jsonl")                         # doctest: +SKIP
    >>> report = fit_model(ds.examples, "my_model/")                        # doctest: +SKIP
    >>> print(report.table())                                               # doctest: +SKIP

    Raises InputError when there are fewer than MIN_IMAGES examples or `out` exists (without
    `overwrite`), BackendUnavailableError without LightGBM."""
    from cropper_engine.engine import fit_default as fd
    from cropper_engine.index.builtin import load_table
    from cropper_engine.models.classical import CLASSICAL_ID, ClassicalEmbedder
    from cropper_engine.models.default_model import DefaultModel, default_model, save_model

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    out_dir = check_fit_out(out, overwrite)
    for d in remove_stale_fits(out_dir):
        say(f"removed {d}, left by a fit that was killed")
    examples = [ex for ex in examples if ex.crops]
    n_images = count_images(examples)
    if n_images < MIN_IMAGES:
        raise too_few(n_images, len(examples))
    folds = max(2, min(int(folds), n_images // 4))
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("cropper-engine fit needs LightGBM: pip install 'cropper-engine[fit]' "
                                      "(or pip install lightgbm)") from None

    # 1. the table: classical descriptors of the training images (originals only)
    from tqdm import tqdm

    from cropper_engine.errors import CropperError
    from cropper_engine.imageio import open_image
    from cropper_engine.index.store import ExampleIndex

    emb = ClassicalEmbedder()
    vectors, kept, bad = [], [], list(skipped)
    for ex in tqdm(examples, desc="fit: table", unit="img", disable=not progress):
        try:
            vectors.append(emb.embed([open_image(ex.image_path).image])[0])
            kept.append(ex)
        except CropperError as exc:
            bad.append(f"{ex.image_path}: {exc}")
    if count_images(kept) < MIN_IMAGES:
        first = bad[0] if bad else "-"
        raise InputError(f"{too_few(count_images(kept), len(kept), 'readable')}; first problem: {first}")
    tmp = out_dir.with_name(f".{out_dir.name}{TMP_INFIX}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        vec = np.stack(vectors).astype(np.float32)
        _CTX.update(embedder=emb, mirror=mirror)
        _write_table(kept, vec, tmp / "table", {**(source or {}), "count": len(kept)})
        from cropper_engine.index.builtin import _load as load_table_dir

        table = load_table_dir(str(tmp / "table"))
        assert isinstance(table, ExampleIndex)
        shipped = default_model()
        _CTX.update(table=table, builtin=load_table(CLASSICAL_ID), shipped=shipped)

        # 2. features, per image (in `jobs` processes)
        by_image: dict[str, set[str]] = {}
        for ex in kept:
            by_image.setdefault(os.path.realpath(ex.image_path), set()).add(ex.id)
        todo = [(i, ex, by_image[os.path.realpath(ex.image_path)]) for i, ex in enumerate(kept)]
        try:
            if jobs > 1:
                from multiprocessing import get_context

                with get_context("spawn").Pool(jobs, initializer=_init_worker,
                                               initargs=(str(tmp / "table"), mirror)) as pool:
                    res = list(tqdm(pool.imap(_image_rows, todo, chunksize=2), total=len(todo), desc="fit: features",
                                    unit="img", disable=not progress))
            else:
                res = [_image_rows(j) for j in tqdm(todo, desc="fit: features", unit="img", disable=not progress)]
        finally:
            load_table_dir.cache_clear()
        ok = [r for r in res if "error" not in r]
        bad += [r["error"] for r in res if "error" in r]
        if len({r["key"] for r in ok}) < MIN_IMAGES:
            raise too_few(len({r["key"] for r in ok}), len(ok), "readable")
        say(f"features of {len(ok)} images{' and their mirror images' if mirror else ''}: "
            f"{time.perf_counter() - t0:.0f} s")

        # 3. cross-validation against the shipped model, 4. the final fit
        from cropper_engine.engine.features import CROP_FEATURES_VERSION, NEIGHBOURS_K, _iou_unit

        n_rounds = rounds or fd.ROUNDS
        tasks, cv = {}, {}
        originals = list(range(len(ok)))
        # folds by image: the examples of one image (a crop run's ratios) are held out together
        keys: dict[str, int] = {}
        for r in ok:
            keys.setdefault(r["key"], len(keys))
        fold_of = np.array([keys[r["key"]] % folds for r in ok])
        for task in ("ratio", "free"):
            rows = _build_rows(ok, task)
            oof = _cross_validate(rows, fold_of, folds, n_rounds, say, f"{task} CV ")
            sel = fd._select(rows, oof, originals, fd.TEMPERATURES)
            temp = max(fd.TEMPERATURES, key=lambda t: np.mean(sel[str(t)]))
            ious = sel[str(temp)]
            disps = fd._disp_blend(rows, oof, originals, temp)
            base = round(fd.baseline_iou(rows, originals, task), 4)
            row: dict[str, Any] = {"iou": _mean(ious), "disp": _mean(disps), "baseline_iou": base,
                   "baseline": "largest centred box of the ratio" if task == "ratio" else "the whole image",
                   "blend_temperature": temp, "images": len(ok), "folds": folds}
            if shipped is not None:
                sb = np.stack([r[f"shipped_{task}"] for r in ok])
                s_iou = _iou_unit(sb, rows.gt[:len(ok)])
                s_disp = np.abs(sb - rows.gt[:len(ok)]).mean(axis=1)
                row.update(shipped_iou=_mean(s_iou), shipped_disp=_mean(s_disp))
                row["per_fold"] = [{"fold": f + 1, "images": int((fold_of == f).sum()),
                                    "iou": _mean(np.asarray(ious)[fold_of == f]),
                                    "disp": _mean(np.asarray(disps)[fold_of == f]),
                                    "shipped_iou": _mean(s_iou[fold_of == f]),
                                    "shipped_disp": _mean(s_disp[fold_of == f])} for f in range(folds)]
            cv[task] = row
            say(f"{task}: CV IoU {row['iou']:.3f} Disp {row['disp']:.3f}; shipped model on the same images "
                f"IoU {row.get('shipped_iou', float('nan')):.3f} Disp {row.get('shipped_disp', float('nan')):.3f}")
            tasks[task] = fd.fit_all(rows, temp, rounds=n_rounds, task=task)
        meta = {
            "kind": "fitted", "version": fd.MODEL_VERSION, "features_version": CROP_FEATURES_VERSION,
            "neighbours": NEIGHBOURS_K,
            "trained_on": {**(source or {}), "images": len(ok), "mirrored": mirror},
            "objective": "lambdarank on IoU with the image's best crop (labels 0..100)", "params": fd.PARAMS,
            "rounds": n_rounds, "row_fraction": fd.ROW_FRACTION, "cv": cv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": (source or {}).get("command", ""), "fit_seconds": round(time.perf_counter() - t0, 1),
        }
        save_model(DefaultModel(tasks, meta), tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:  # nothing half-written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from cropper_engine.models.fitted import remember

    remember(out_dir)
    return FitReport(str(out_dir), len(ok), bad, cv, time.perf_counter() - t0)


__all__ = ["DATASET_KINDS", "MIN_IMAGES", "FitReport", "fit_model", "read_results", "read_training"]
