"""What else the no-VLM default's ranker was tried with: learning set-ups and ways to choose the
crop from the ranked candidates, each by the same grouped 5-fold CV on FCDB train as `bench cv`.

    python -m bench ranker-study [--fcdb ../shared/data/fcdb] [--cache ROWS.npz] [--tasks ratio,free] [--out PATH]

The rows (every training image and its mirror image, the candidates and their features, as
`fit_default` builds them) take about 6 minutes; `--cache` keeps them for a second run. Then, per
task, about 3-6 minutes per CV, two CVs at a time on 2 cores (~30 minutes in all):

  set-ups (each one CV, two at a time in threads): the shipped LambdaRank (labels: IoU x 100, gain linear);
    every feature that varies within an image also as its z-score among the image's candidates;
    smaller, more regularised trees; the shipped features plus the tried ones of
    bench/studies/extra_features.py (colour contrast of the cut strips, thirds, saliency mass boxes, map
    concentration); and, ratio given only, the shipped features without each family (the
    neighbours' crops, the saliency maps, the gradient map; and the box's geometry alone), gain IoU^4 (the top
    candidates weigh more), labels relative to the image's best candidate, LambdaRank truncated
    at 5 instead of 20, and each fold's model fitted on half or a quarter of its training images
    (what more data would give);
  choices (on the shipped set-up's out-of-fold scores, no refit): the shipped blend (all boxes,
    weights exp(score / T)), the blend of the best K, the weighted median box, the scores of a box
    and of its mirror image averaged (test-time mirroring), and a second model stacked on the
    blend: LightGBM regressions of the ground truth's offset from the blended box (centre and log
    scale with a ratio, the four sides free-form) on the blend's own features (its box, the spread
    of the boxes it averages, the weighted mean of their features), fitted on the other folds'
    out-of-fold blends and applied at full or half strength.

FCDB val is never read. Writes bench/results/ranker_study.json (with provenance) and .md.
Needs lightgbm (`pip install 'cropper-engine[fit]'`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, save_json  # noqa: E402  (first: it notes the load at the start)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fcdb"
DEFAULT_OUT = RESULTS / "ranker_study.json"
FOLDS = 5


def _starts(r: Any) -> np.ndarray:
    return np.r_[0, np.flatnonzero(np.diff(r.group)) + 1, len(r.group)]


def _mean_iou(boxes: np.ndarray, gt: np.ndarray) -> float:
    from cropper_engine.engine.features import _iou_unit

    return round(float(_iou_unit(np.asarray(boxes), np.asarray(gt)).mean()), 4)


def _zscores(r: Any) -> Any:
    """The rows with each feature that varies within images also as its z-score among the image's
    candidates (trees split on absolute values; this gives them the within-image order too)."""
    from dataclasses import replace

    st = _starts(r)
    cnt = np.diff(st)
    gid = np.repeat(np.arange(len(cnt)), cnt)
    x = r.x.astype(np.float64)
    mean = np.add.reduceat(x, st[:-1], axis=0) / cnt[:, None]
    std = np.sqrt(np.maximum(np.add.reduceat(x * x, st[:-1], axis=0) / cnt[:, None] - mean ** 2, 0))
    cols = np.flatnonzero((std > 1e-9).mean(0) > 0.5)
    z = (x[:, cols] - mean[gid][:, cols]) / np.maximum(std[gid][:, cols], 1e-9)
    return replace(r, x=np.concatenate([r.x, z.astype(np.float32)], 1),
                   names=r.names + [f"z_{r.names[i]}" for i in cols])


FAMILIES = {  # the shipped features by family, for the ablations (by name prefix)
    "the neighbours' crops (nb_*)": ("nb_",),
    "the saliency maps (sr_*, fg_*, ft_*)": ("sr_", "fg_", "ft_"),
    "the gradient map (grad_*)": ("grad_",),
}


def _without(r: Any, prefixes: tuple[str, ...]) -> Any:
    from dataclasses import replace

    keep = [i for i, n in enumerate(r.names) if not n.startswith(prefixes)]
    return replace(r, x=r.x[:, keep], names=[r.names[i] for i in keep])


def _geometry_only(r: Any) -> Any:
    return _without(r, tuple(p for ps in FAMILIES.values() for p in ps))


def _with(r: Any, extra: tuple[np.ndarray, list[str]]) -> Any:
    from dataclasses import replace

    return replace(r, x=np.concatenate([r.x, extra[0]], 1), names=r.names + extra[1])


def _variant_fit(gain_power: float = 1.0, relative: bool = False, share: float = 1.0) -> Any:
    """fit_default._fit with another gain, relative labels, or only a share of the training images."""
    import lightgbm as lgb

    from cropper_engine.engine import fit_default as fd

    def fit(rows: Any, keep: np.ndarray, params: dict[str, Any], rounds: int) -> Any:
        if share < 1.0:
            keep = keep & (np.random.default_rng(7).random(int(rows.image.max()) + 1) < share)[rows.image]
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(rows.group[idx], kind="stable")]
        y = rows.y[idx]
        if relative:  # 1 for the image's best candidate, down by twice the IoU it lacks
            best = np.zeros(rows.group.max() + 1)
            np.maximum.at(best, rows.group[idx], y)
            y = np.clip(1 - 2 * (best[rows.group[idx]] - y), 0, 1)
        labels = np.clip(np.round(y * fd.LABEL_LEVELS), 0, fd.LABEL_LEVELS).astype(int)
        _, counts = np.unique(rows.group[idx], return_counts=True)
        gain = [fd.LABEL_LEVELS * (v / fd.LABEL_LEVELS) ** gain_power for v in range(fd.LABEL_LEVELS + 1)]
        return lgb.train({**params, "label_gain": gain}, lgb.Dataset(rows.x[idx], labels, group=counts), rounds)
    return fit


SHIPPED = "shipped: LambdaRank, labels IoU x 100, linear gain, truncation 20"
REGULARISED = {"num_leaves": 15, "min_data_in_leaf": 400, "feature_fraction": 0.5}
Job = tuple[str, Any, Any, dict[str, Any], str]  # name, rows (a function: made in the thread), fit, params, task


def _run_job(job: Job) -> tuple[str, dict[str, Any], np.ndarray | None]:
    from cropper_engine.engine import fit_default as fd

    name, rows_of, fit, params, task = job
    r = rows_of()
    oof = np.zeros(len(r.y)) if name == SHIPPED else None
    return name, fd.cross_validate(r, FOLDS, params=params, log=lambda s: None, task=task, oof=oof, fit=fit), oof


def setups(r: Any, task: str, log: Any, extra: tuple[np.ndarray, list[str]] | None = None,
           jobs: int = 2) -> tuple[dict[str, float], np.ndarray, float]:
    """IoU of each learning set-up (one CV each, `jobs` at a time, in threads); the shipped one's
    out-of-fold scores and blend temperature."""
    todo: list[Job] = [
        (SHIPPED, lambda: r, None, {}, task),
        ("features: each also as its z-score among the image's candidates", lambda: _zscores(r), None, {}, task),
        ("trees: 15 leaves, 400 rows a leaf, half the features a tree", lambda: r, None, REGULARISED, task)]
    if extra is not None:
        todo.append(("features: + colour of the cut strips, thirds, saliency mass boxes "
                     "(bench/studies/extra_features.py)", lambda: _with(r, extra), None, {}, task))
    if task == "ratio":
        for family, prefixes in FAMILIES.items():
            todo.append((f"features: without {family}", lambda p=prefixes: _without(r, p), None, {}, task))
        todo.append(("features: the box's geometry only (position, size, ratio; no map, no neighbour)",
                     lambda: _geometry_only(r), None, {}, task))
        todo.extend([("gain IoU^4", lambda: r, _variant_fit(4.0), {}, task),
                     ("labels relative to the image's best candidate", lambda: r, _variant_fit(relative=True), {},
                      task),
                     ("truncation 5", lambda: r, None, {"lambdarank_truncation_level": 5}, task),
                     ("data: half the training images (each fold's model)", lambda: r, _variant_fit(share=0.5), {},
                      task),
                     ("data: a quarter of the training images (each fold's model)", lambda: r,
                      _variant_fit(share=0.25), {}, task)])
    # threads, not processes: LightGBM fits and predicts without the GIL (one thread a CV), and
    # a forked child of a parent with threads can deadlock
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="ranker-study") as pool:
        done = list(pool.map(_run_job, todo))
    out: dict[str, float] = {}
    oof, temperature = np.zeros(len(r.y)), 0.2
    for name, res, o in done:
        out[name] = res["iou"]
        log(f"{task} {name}: {res['iou']}")
        if o is not None:
            oof, temperature = o, res["blend_temperature"]
    return out, oof, temperature


def choices(r: Any, task: str, oof: np.ndarray, temperature: float, log: Any) -> dict[str, float]:
    """IoU of each way to choose the crop from the same out-of-fold scores (original images only)."""
    from cropper_engine.engine.default_pipeline import blend

    st = _starts(r)
    n = int(r.image.max()) + 1  # groups 0..n-1: the originals; n..2n-1 their mirror images
    gt = r.gt[:n]
    out: dict[str, float] = {}

    def each(fn: Any) -> np.ndarray:
        return np.array([fn(r.boxes[st[g]:st[g + 1]], oof[st[g]:st[g + 1]], g) for g in range(n)])

    out[f"shipped: blend of all boxes, T={temperature}"] = _mean_iou(each(lambda b, p, g: blend(b, p, temperature)),
                                                                   gt)
    out["the single best box"] = _mean_iou(each(lambda b, p, g: b[int(np.argmax(p))]), gt)
    for k in (5, 10, 20):
        out[f"blend of the best {k}"] = _mean_iou(each(
            lambda b, p, g, k=k: blend(b[np.argsort(-p)[:k]], np.sort(p)[::-1][:k], temperature)), gt)

    def wmedian(b: np.ndarray, p: np.ndarray, g: int) -> np.ndarray:
        w = np.exp((p - p.max()) / temperature)
        w /= w.sum()
        cols = []
        for j in range(4):
            o = np.argsort(b[:, j])
            cols.append(b[o[min(np.searchsorted(np.cumsum(w[o]), 0.5), len(o) - 1)], j])
        return np.array(cols)

    out["weighted median box"] = _mean_iou(each(wmedian), gt)

    def mirrored(b: np.ndarray, p: np.ndarray, g: int) -> np.ndarray:
        s, e = st[g + n], st[g + n + 1]
        mb = r.boxes[s:e]
        back = {tuple(np.round(x, 5)): i for i, x in enumerate(np.stack([1 - mb[:, 2], mb[:, 1], 1 - mb[:, 0],
                                                                        mb[:, 3]], 1))}
        idx = np.array([back.get(tuple(np.round(x, 5)), -1) for x in b])
        q = p.copy()
        q[idx >= 0] = (p[idx >= 0] + oof[s:e][idx[idx >= 0]]) / 2
        return blend(b, q, temperature)

    out["scores averaged with the mirror image's (test-time mirroring)"] = _mean_iou(each(mirrored), gt)
    for strength, iou in stacked(r, task, oof, temperature).items():
        out[f"a stacked model correcting the blend, at {strength:g} strength"] = iou
    for k, v in out.items():
        log(f"{task} {k}: {v}")
    return out


def stacked(r: Any, task: str, oof: np.ndarray, temperature: float) -> dict[float, float]:
    """Regressions of the ground truth's offset from the blended box, fitted on the other folds."""
    import lightgbm as lgb

    from cropper_engine.engine.features import fit_ratio_unit

    st = _starts(r)
    groups = len(st) - 1
    n = int(r.image.max()) + 1
    feats, blends = [], []
    for g in range(groups):
        s, e = st[g], st[g + 1]
        p, b, x = oof[s:e], r.boxes[s:e], r.x[s:e].astype(np.float64)
        w = np.exp((p - p.max()) / temperature)
        w /= w.sum()
        bb = (b * w[:, None]).sum(0)
        spread = np.sqrt((w[:, None] * (b - bb) ** 2).sum(0))
        top = np.sort(p)[::-1]
        feats.append(np.r_[bb, spread, (x * w[:, None]).sum(0), -(w * np.log(w + 1e-12)).sum(), top[0],
                           top[0] - top[min(4, len(top) - 1)]])
        blends.append(bb)
    f, b, gt = np.array(feats), np.array(blends), r.gt
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if task == "ratio":
        y = np.stack([((gt[:, 0] + gt[:, 2]) - (b[:, 0] + b[:, 2])) / 2 / bw,
                      ((gt[:, 1] + gt[:, 3]) - (b[:, 1] + b[:, 3])) / 2 / bh, np.log((gt[:, 2] - gt[:, 0]) / bw)], 1)
    else:
        y = np.stack([(gt[:, 0] - b[:, 0]) / bw, (gt[:, 1] - b[:, 1]) / bh, (gt[:, 2] - b[:, 2]) / bw,
                      (gt[:, 3] - b[:, 3]) / bh], 1)
    image = np.array([r.image[st[g]] for g in range(groups)])
    params = {"objective": "huber", "alpha": 0.1, "learning_rate": 0.03, "num_leaves": 15, "min_data_in_leaf": 40,
              "feature_fraction": 0.7, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 5.0,
              "verbose": -1, "num_threads": 1, "seed": 0}
    pred = np.zeros_like(y)
    for fold in range(FOLDS):
        train, test = image % FOLDS != fold, image % FOLDS == fold
        for j in range(y.shape[1]):
            pred[test, j] = lgb.train(params, lgb.Dataset(f[train], y[train, j]), 100).predict(f[test])
    out = {}
    for k in (1.0, 0.5):
        d = k * pred[:n]
        if task == "ratio":
            cx = (b[:n, 0] + b[:n, 2]) / 2 + d[:, 0] * bw[:n]
            cy = (b[:n, 1] + b[:n, 3]) / 2 + d[:, 1] * bh[:n]
            s = np.exp(d[:, 2])
            box = np.stack([cx - bw[:n] * s / 2, cy - bh[:n] * s / 2, cx + bw[:n] * s / 2, cy + bh[:n] * s / 2], 1)
            box = np.concatenate([fit_ratio_unit(box[i:i + 1], float(bw[i] / bh[i]), 1.0) for i in range(n)])
        else:
            box = np.clip(b[:n] + d * np.stack([bw[:n], bh[:n], bw[:n], bh[:n]], 1), 0, 1)
        out[k] = _mean_iou(box, gt[:n])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fcdb", default=str(DEFAULT_DATA), help="the FCDB folder (train.jsonl, images/)")
    ap.add_argument("--cache", default=None, metavar="ROWS.npz", help="the fitting rows: read if there, else written")
    ap.add_argument("--tasks", default="ratio,free")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the features and the CVs")
    ap.add_argument("--no-tried-features", action="store_true",
                    help="skip the set-up with the tried features (bench/studies/extra_features.py: ~3 min more)")
    ap.add_argument("--limit", type=int, default=None, help="the first N training images only (a smoke test)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        sys.exit("the study needs lightgbm: pip install 'cropper-engine[fit]' (or pip install lightgbm)")
    from cropper_engine.engine.fit_default import build_rows, load_rows, save_rows

    t0 = time.perf_counter()
    if a.cache and Path(a.cache).is_file():
        rows = load_rows(a.cache)
    else:
        if not (Path(a.fcdb) / "train.jsonl").exists():
            sys.exit(f"{Path(a.fcdb) / 'train.jsonl'} not found: pass --fcdb DIR (the FCDB folder)")
        rows = build_rows(a.fcdb, mirror=True, jobs=a.jobs, limit=a.limit)
        if a.cache:
            save_rows(rows, a.cache)
    print(f"rows: {time.perf_counter() - t0:.0f} s", flush=True)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    extra = None
    if not a.no_tried_features:
        from bench.studies.extra_features import columns

        extra = columns({t: rows[t] for t in tasks}, a.fcdb, log=lambda s: print(s, flush=True))
        print(f"tried features: {time.perf_counter() - t0:.0f} s", flush=True)
    study: dict[str, Any] = {}
    for task in tasks:
        r = rows[task]
        su, oof, temperature = setups(r, task, lambda s: print(s, flush=True), extra[task] if extra else None, a.jobs)
        study[task] = {"setups": su, "choices": choices(r, task, oof, temperature, lambda s: print(s, flush=True)),
                       "images": int(r.image.max()) + 1}
    figures = {"what": "FCDB train, grouped 5-fold CV: the default's ranker, other set-ups and choices",
               "folds": FOLDS, "limit": a.limit, "study": study}
    path = save_json(a.out, figures)
    lines = ["| task | variant | CV IoU |", "|---|---|---|"]
    for task, s in study.items():
        for part in ("setups", "choices"):
            lines += [f"| {task} | {k} | {v:.4f} |" for k, v in s[part].items()]
    Path(path).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return figures


if __name__ == "__main__":
    main()
