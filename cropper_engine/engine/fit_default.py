"""Fit the no-VLM default's ranking models on FCDB's training split and ship them.

    python -m cropper_engine.engine.fit_default --fcdb ../shared/data/fcdb

Needs LightGBM at fit time only (`pip install lightgbm`); the package runs the exported trees
with numpy. Reads the images from the dataset folder and writes into the package:

1. the built-in retrieval table (index/builtin.py: classical descriptors and crops of the
   1,138 training images; `--skip-table` keeps the one there);
2. for every training image and its mirror image: the classical descriptor, its 30 nearest
   neighbours in that table leave-one-out (the image itself is never its own neighbour, as at
   test time), the image analysis, the detected faces (MediaPipe, where installed), the
   candidates, constrained as the engine constrains them when it keeps faces (grown around the
   main faces, never cutting one: engine/subject/faces.py), and their features, for the ratio task
   (the ground truth's ratio given, as in the literature) and the free-form task; the target is
   each candidate's IoU with the ground-truth crop (`build_rows` takes an FCDB folder or any
   list of `{"image", "crop"}` records; `--cache FILE.npz` keeps the rows for repeated CV runs);
3. 5-fold cross-validation grouped by image (a mirror stays with its original) for the figures
   and the blend temperature (default_pipeline.blend), then one LambdaRank model per task on all rows, exported to
   assets/default_model/ (models/default_model.py) with a few rows and LightGBM's outputs for
   them, which the tests compare with the numpy inference.

FCDB's val split is never read here. About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.engine.features import CROP_FEATURES_VERSION, NEIGHBOURS_K, _iou_unit, crop_feature_dict

MODEL_VERSION = 1
TASKS = ("ratio", "free")
TEMPERATURES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # of the blend, chosen by cross-validation
PARAMS: dict[str, Any] = {
    "objective": "lambdarank", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 100,
    "max_depth": 6, "feature_fraction": 0.7, "bagging_fraction": 0.8, "bagging_freq": 1,
    "lambda_l2": 1.0, "lambdarank_truncation_level": 20, "verbose": -1, "force_col_wise": True,
}
ROUNDS = 300
ROW_FRACTION = 0.15  # candidates per image kept for fitting (at random): ~x7 faster, same CV figures
LABEL_LEVELS = 100  # LambdaRank labels: IoU quantised to 0..100, gain = label (linear in IoU)


@dataclass
class Rows:
    x: np.ndarray  # float32 [N, F]
    y: np.ndarray  # IoU with the ground truth [N]
    group: np.ndarray  # image (or mirror) number [N]
    image: np.ndarray  # the original image's number [N]: folds keep mirrors with their originals
    boxes: np.ndarray  # [N, 4] unit
    gt: np.ndarray  # [groups, 4] unit
    names: list[str]
    faces: list[np.ndarray] = field(default_factory=list)  # per group: detected faces [n, 4] unit, largest first


_STATE: dict[str, Any] = {}


def read_fcdb(fcdb: str | Path, split: str = "train.jsonl") -> list[dict[str, Any]]:
    """FCDB's JSONL records (`image` relative to `images/`, `crop` [x1, y1, x2, y2] in pixels)."""
    return [json.loads(line) for line in (Path(fcdb) / split).read_text().splitlines() if line.strip()]


def _init(images: str, faces: bool = True) -> None:
    from cropper_engine.index.builtin import load_table
    from cropper_engine.models.classical import CLASSICAL_ID, ClassicalEmbedder

    _STATE["table"] = load_table(CLASSICAL_ID)
    _STATE["emb"] = ClassicalEmbedder()
    _STATE["images"] = images
    _STATE["faces"] = None
    if faces:
        from cropper_engine.engine.subject import face_detector

        _STATE["faces"] = face_detector()


def keep_faces_unit(boxes_unit: np.ndarray, faces: Sequence[Any], width: int, height: int, ratio: float | None,
                    min_side: float = 0.1) -> np.ndarray:
    """Candidates as the engine constrains them when it keeps faces (engine/constrain.py `_constrain`):
    each grown to hold the main faces and repaired so it cuts no face (engine/subject/faces.py)."""
    if not faces:
        return boxes_unit
    from cropper_engine.engine.subject import faces_to_keep, keep_faces_whole
    from cropper_engine.types import Box

    kept = faces_to_keep(faces, ratio, width, height)
    min_w, min_h = max(2.0, min_side * width), max(2.0, min_side * height)
    out = np.empty_like(boxes_unit)
    for i, u in enumerate(boxes_unit):
        b, _ = keep_faces_whole(Box.from_unit(u, width, height), kept, width, height, ratio, None, min_w, min_h)
        out[i] = b.to_unit(width, height)
    return out


def _image_rows(args: tuple[int, str, list[float], bool, str]) -> dict[str, Any]:
    """Features and targets of one training image (mirrored or not), both tasks."""
    from PIL import Image

    from cropper_engine.engine.analysis import analyse
    from cropper_engine.engine.default_pipeline import candidates, model_neighbours
    from cropper_engine.engine.subject import detect_faces
    from cropper_engine.imageio import open_image

    _, image, crop, mirror, image_id = args
    path = Path(image) if Path(image).is_absolute() else Path(_STATE["images"]) / image
    img = open_image(str(path)).image
    w, h = img.size
    gt = np.array([crop[0] / w, crop[1] / h, crop[2] / w, crop[3] / h])
    if mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        gt = np.array([1 - gt[2], gt[1], 1 - gt[0], gt[3]])
    vec = _STATE["emb"].embed([img])[0]
    nb = model_neighbours(_STATE["table"], vec, {image_id}, NEIGHBOURS_K)
    an = analyse(img)
    faces = detect_faces(img, _STATE["faces"]) if _STATE.get("faces") is not None else []
    out: dict[str, Any] = {"gt": gt, "faces": np.array([f.box.to_unit(w, h) for f in faces]).reshape(-1, 4)}
    for task in TASKS:
        ratio = (crop[2] - crop[0]) / (crop[3] - crop[1]) if task == "ratio" else None
        boxes, _ = candidates(an, ratio, nb)
        boxes = keep_faces_unit(boxes, faces, w, h, ratio)  # what the engine ranks when it keeps faces
        feats = crop_feature_dict(an, boxes, ratio, nb)
        out[task] = (boxes, feats, _iou_unit(boxes, gt[None]))
    return out


def build_rows(data: str | Path | Sequence[dict[str, Any]], images: str | Path | None = None, mirror: bool = True,
               jobs: int = 2, limit: int | None = None, split: str = "train.jsonl",
               faces: bool = True) -> dict[str, Rows]:
    """The fitting rows of both tasks for a list of records (`{"image", "crop", "id"?}`: the
    image relative to `images` or absolute, one ground-truth crop in pixels), or for an FCDB
    folder (its `split`, images in its `images/`). `faces`: detect faces (MediaPipe, where
    installed) and constrain the candidates as the engine does when it keeps faces."""
    if isinstance(data, (str, Path)):
        records = read_fcdb(data, split)
        images = Path(data) / "images" if images is None else images
    else:
        records = list(data)
    records = records[:limit] if limit else records
    todo = [(i, r["image"], [float(v) for v in r["crop"]], False, r.get("id", r["image"]))
            for i, r in enumerate(records)]
    if mirror:
        todo += [(i, a[1], a[2], True, a[4]) for i, a in enumerate(todo)]
    init = (str(images or ""), faces)
    if jobs > 1:
        from multiprocessing import get_context

        # spawn, not fork: a parent with threads (OpenMP, a test runner's) can deadlock forked children
        with get_context("spawn").Pool(jobs, initializer=_init, initargs=init) as pool:
            res = pool.map(_image_rows, todo, chunksize=8)
    else:
        _init(*init)
        res = [_image_rows(a) for a in todo]
    out = {}
    for task in TASKS:
        names = sorted(res[0][task][1])
        x = np.concatenate([np.stack([r[task][1][k] for k in names], 1) for r in res]).astype(np.float32)
        y = np.concatenate([r[task][2] for r in res])
        group = np.concatenate([np.full(len(r[task][2]), j) for j, r in enumerate(res)])
        image = np.array([a[0] for a in todo])[group]
        boxes = np.concatenate([r[task][0] for r in res])
        gt = np.stack([r["gt"] for r in res])
        out[task] = Rows(x, y, group, image, boxes, gt, names, [r["faces"] for r in res])
    return out


def save_rows(rows: dict[str, Rows], path: str | Path) -> None:
    """Cache fitting rows (a few hundred MB for FCDB train with mirrors) for cheap CV runs."""
    arrays: dict[str, np.ndarray] = {}
    for task, r in rows.items():
        for k in ("x", "y", "group", "image", "boxes", "gt"):
            arrays[f"{task}.{k}"] = getattr(r, k)
        arrays[f"{task}.names"] = np.array(r.names)
        arrays[f"{task}.nfaces"] = np.array([len(f) for f in r.faces], dtype=np.int64)
        arrays[f"{task}.faces"] = np.concatenate(r.faces).reshape(-1, 4) if r.faces else np.zeros((0, 4))
    np.savez(path, **arrays)


def load_rows(path: str | Path) -> dict[str, Rows]:
    a = np.load(path, allow_pickle=False)
    out = {}
    for task in TASKS:
        n = a[f"{task}.nfaces"]
        faces = np.split(a[f"{task}.faces"], np.cumsum(n)[:-1]) if len(n) else []
        out[task] = Rows(a[f"{task}.x"], a[f"{task}.y"], a[f"{task}.group"], a[f"{task}.image"], a[f"{task}.boxes"],
                         a[f"{task}.gt"], [str(v) for v in a[f"{task}.names"]], list(faces))
    return out


def _fit(rows: Rows, keep: np.ndarray, params: dict[str, Any], rounds: int) -> Any:
    import lightgbm as lgb

    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(rows.group[idx], kind="stable")]  # LambdaRank wants each group contiguous
    if params.get("objective") in ("regression", "huber", "cross_entropy"):  # pointwise: the IoU itself
        return lgb.train(params, lgb.Dataset(rows.x[idx], rows.y[idx]), rounds)
    labels = np.clip(np.round(rows.y[idx] * LABEL_LEVELS), 0, LABEL_LEVELS).astype(int)
    _, counts = np.unique(rows.group[idx], return_counts=True)
    p = {**params, "label_gain": [float(v) for v in range(LABEL_LEVELS + 1)]}
    return lgb.train(p, lgb.Dataset(rows.x[idx], labels, group=counts), rounds)


def _select(rows: Rows, pred: np.ndarray, groups: Sequence[int],
            temperatures: Sequence[float]) -> dict[str, list[float]]:
    """IoU of the chosen crop per image: the single best box ("best") and the blend at each
    temperature (default_pipeline.blend)."""
    from cropper_engine.engine.default_pipeline import blend

    out: dict[str, list[float]] = {"best": [], **{str(t): [] for t in temperatures}}
    starts = np.r_[0, np.flatnonzero(np.diff(rows.group)) + 1, len(rows.group)]
    for gi in groups:
        s, e = starts[gi], starts[gi + 1]
        gt = rows.gt[gi][None]
        out["best"].append(float(rows.y[s + int(np.argmax(pred[s:e]))]))
        for t in temperatures:
            box = blend(rows.boxes[s:e], pred[s:e], t)
            out[str(t)].append(float(_iou_unit(box[None], gt)[0]))
    return out


def _disp_blend(rows: Rows, pred: np.ndarray, groups: Sequence[int], temperature: float) -> list[float]:
    """Disp (mean absolute edge offset, unit of the image side) of the blended crop per image."""
    from cropper_engine.engine.default_pipeline import blend

    starts = np.r_[0, np.flatnonzero(np.diff(rows.group)) + 1, len(rows.group)]
    return [float(np.abs(blend(rows.boxes[s:e], pred[s:e], temperature) - rows.gt[g]).mean())
            for g, s, e in ((g, starts[g], starts[g + 1]) for g in groups)]


def baseline_iou(rows: Rows, groups: Sequence[int], task: str) -> float:
    """The centre baseline's IoU on these images: the largest centred box of the ground truth's
    ratio (ratio task) or the whole image (free-form)."""
    out = []
    for g in groups:
        gt = rows.gt[g]
        box = np.array([0.0, 0.0, 1.0, 1.0])
        if task == "ratio":
            r = (gt[2] - gt[0]) / (gt[3] - gt[1])  # in unit coordinates
            w, h = (1.0, 1.0 / r) if r > 1 else (r, 1.0)
            box = np.array([(1 - w) / 2, (1 - h) / 2, (1 + w) / 2, (1 + h) / 2])
        out.append(float(_iou_unit(box[None], gt[None])[0]))
    return float(np.mean(out))


def cross_validate(rows: Rows, folds: int = 5, params: dict[str, Any] | None = None, rounds: int = ROUNDS,
                   fraction: float = ROW_FRACTION, seed: int = 0, log: Any = print,
                   task: str = "ratio", oof: np.ndarray | None = None, fit: Any = None) -> dict[str, Any]:
    """Grouped k-fold CV (mirrors stay with their originals). `fit(rows, keep, params, rounds)`
    replaces `_fit` (another learning set-up); each fold's model runs on one thread, so several
    CVs can run side by side in threads (LightGBM releases the GIL)."""
    params = {**PARAMS, **(params or {}), "seed": seed, "num_threads": 1}
    fit = fit or _fit
    rng = np.random.default_rng(seed)
    sample = rng.random(len(rows.y)) < fraction
    fold = rows.image % folds
    originals = list(range(int(rows.image.max()) + 1))  # groups 0..n-1; mirrors are numbered after them
    pred = np.zeros(len(rows.y))
    for f in range(folds):
        t0 = time.perf_counter()
        model = fit(rows, (fold != f) & sample, params, rounds)
        test = fold == f
        pred[test] = model.predict(rows.x[test])
        log(f"  fold {f + 1}/{folds}: {time.perf_counter() - t0:.0f} s")
    if oof is not None:
        oof[:] = pred
    sel = _select(rows, pred, originals, TEMPERATURES)
    figures = {k: round(float(np.mean(v)), 4) for k, v in sel.items()}
    best = max(TEMPERATURES, key=lambda t: np.mean(sel[str(t)]))
    return {"iou_by_choice": figures, "blend_temperature": best, "iou": round(float(np.mean(sel[str(best)])), 4),
            "disp": round(float(np.mean(_disp_blend(rows, pred, originals, best))), 4),
            "images": len(originals), "baseline_iou": round(baseline_iou(rows, originals, task), 4),
            "baseline": "largest centred box of the ratio" if task == "ratio" else "the whole image"}


def fit_all(rows: Rows, blend_temperature: float, params: dict[str, Any] | None = None, rounds: int = ROUNDS,
            fraction: float = ROW_FRACTION, seed: int = 0, task: str = "ratio") -> Any:
    from cropper_engine.models.default_model import TaskModel, TreeEnsemble

    params = {**PARAMS, **(params or {}), "seed": seed, "num_threads": 1}
    rng = np.random.default_rng(seed)
    booster = _fit(rows, rng.random(len(rows.y)) < fraction, params, rounds)
    trees = TreeEnsemble.from_lightgbm(booster.dump_model())
    pick = np.random.default_rng(1).choice(len(rows.y), 16, replace=False)
    check_x = rows.x[pick]
    check_y = booster.predict(check_x)
    return TaskModel(task, tuple(rows.names), trees, blend_temperature, check_x, np.asarray(check_y))


def main(argv: list[str] | None = None) -> None:
    from cropper_engine.models.default_model import MODEL_DIR, DefaultModel, save_model

    ap = argparse.ArgumentParser(prog="python -m cropper_engine.engine.fit_default",
                                 description="Fit the no-VLM default's models on FCDB train and ship them.")
    ap.add_argument("--fcdb", required=True, help="the FCDB folder (train.jsonl and images/)")
    ap.add_argument("--out", default=str(MODEL_DIR), help="model folder [default: the package's assets]")
    ap.add_argument("--skip-table", action="store_true", help="keep the built-in retrieval table as it is")
    ap.add_argument("--no-mirror", action="store_true", help="do not add mirrored training images")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds (0: skip the CV)")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the features")
    ap.add_argument("--limit", type=int, default=None, help="use the first N training images (a smoke test)")
    ap.add_argument("--cache", default=None, metavar="FILE.npz",
                    help="the fitting rows: read from FILE when it exists, else computed and written there "
                         "(for repeated CV runs; delete it after changing a feature)")
    a = ap.parse_args(argv)

    from cropper_engine.index.builtin import build_table

    t0 = time.perf_counter()
    if not a.skip_table:
        print(f"built-in table: {build_table(a.fcdb)}", flush=True)
    if a.cache and Path(a.cache).is_file():
        rows = load_rows(a.cache)
        print(f"rows read from {a.cache}", flush=True)
    else:
        rows = build_rows(a.fcdb, mirror=not a.no_mirror, jobs=a.jobs, limit=a.limit)
        if a.cache:
            save_rows(rows, a.cache)
    print(f"features: {time.perf_counter() - t0:.0f} s", flush=True)
    tasks, cv = {}, {}
    for task in TASKS:
        r = rows[task]
        print(f"{task}: {len(r.y)} candidate rows, {len(r.names)} features", flush=True)
        blend = 0.2
        if a.folds > 1:
            cv[task] = cross_validate(r, a.folds, log=lambda s: print(s, flush=True), task=task)
            blend = cv[task]["blend_temperature"]
            print(f"{task} CV: {cv[task]}", flush=True)
        tasks[task] = fit_all(r, blend, task=task)
    meta = {
        "version": MODEL_VERSION, "features_version": CROP_FEATURES_VERSION, "neighbours": NEIGHBOURS_K,
        "trained_on": {"dataset": "fcdb", "split": "train", "images": int(rows["ratio"].image.max()) + 1,
                       "mirrored": not a.no_mirror},
        "objective": "lambdarank on IoU with the ground truth (labels 0..100)", "params": PARAMS,
        "rounds": ROUNDS, "row_fraction": ROW_FRACTION, "cv": cv,
        "command": "python -m cropper_engine.engine.fit_default --fcdb ../shared/data/fcdb",
    }
    save_model(DefaultModel(tasks, meta), a.out)
    print(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
