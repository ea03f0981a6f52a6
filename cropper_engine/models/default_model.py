"""The fitted scorer of the no-VLM default: gradient-boosted trees evaluated in numpy.

`python -m cropper_engine.engine.fit_default --fcdb ../shared/data/fcdb` fits one ranking
model per task family on FCDB's training split (LightGBM, at fit time only) and exports the
trees as flat arrays, so running them needs numpy alone (no pickle, no LightGBM):

    assets/default_model/model.json   versions, feature names, selection settings, CV figures
                         ratio.npz    trees for the aspect-ratio task
                         free.npz     trees for the free-form and subject tasks
                                      (each also holds a few feature rows and LightGBM's own
                                      outputs for them: tests check the numpy inference)

A model's raw output ranks the candidates of one image (higher: closer to a human crop); its
logistic is the 0..1 `score` shown with each candidate.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
TASK_FILES = {"ratio": "ratio.npz", "free": "free.npz"}


@dataclass
class TreeEnsemble:
    """Binary trees over flat arrays: node i splits on `feature[i]` at `threshold[i]`
    (x <= threshold: `left[i]`, else `right[i]`) or is a leaf (`feature[i] < 0`) worth `value[i]`.
    The prediction is `base` plus the sum of one leaf per tree (`roots`)."""

    feature: np.ndarray  # int32 [nodes]
    threshold: np.ndarray  # float64 [nodes]
    left: np.ndarray  # int32 [nodes]
    right: np.ndarray  # int32 [nodes]
    value: np.ndarray  # float64 [nodes]
    roots: np.ndarray  # int32 [trees]
    depth: int
    base: float = 0.0

    def __post_init__(self) -> None:
        # children side by side (child[2 i + went_right]); a leaf is its own child, so every row
        # can take `depth` steps without a test for leaves
        n = len(self.feature)
        leaf = self.feature < 0
        idx = np.arange(n, dtype=np.intp)
        self._child = np.stack([np.where(leaf, idx, self.left), np.where(leaf, idx, self.right)], 1).ravel()
        self._child = self._child.astype(np.intp)
        self._feat = np.maximum(self.feature, 0).astype(np.intp)
        # the rows are float32 (as fitted); for a float32 x, x > t (float64) exactly when x > the
        # largest float32 not above t: comparisons in float32 give the same leaves, bit for bit
        thr64 = np.where(leaf, np.inf, self.threshold)
        thr = thr64.astype(np.float32)
        up = thr.astype(np.float64) > thr64
        thr[up] = np.nextafter(thr[up], np.float32(-np.inf))
        self._thr = thr
        self._roots = self.roots.astype(np.intp)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs for rows x [N, F] (cast to float32 first, as the model was fitted)."""
        x = np.nan_to_num(np.asarray(x, dtype=np.float32))
        n = x.shape[0] if x.ndim == 2 else 0
        if n == 0:
            return np.zeros(0)
        cols = np.ascontiguousarray(x.T)  # feature-major: a tree's first split reads whole rows
        flat = cols.ravel()
        offset = self._feat * n  # where each node's feature starts in `flat`
        row = np.arange(n, dtype=np.intp)
        roots, child, thr = self._roots, self._child, self._thr
        # np.take with mode="wrap" skips the bounds checks of fancy indexing (every index is valid)
        node = np.take(child, 2 * roots[:, None] + (cols[self._feat[roots]] > thr[roots][:, None]), mode="wrap")
        for _ in range(self.depth - 1):  # [trees, N]: each row's node in each tree
            v = np.take(flat, np.take(offset, node, mode="wrap") + row, mode="wrap")
            right = v > np.take(thr, node, mode="wrap")
            node = np.take(child, 2 * node + right, mode="wrap")
        return self.base + np.take(self.value, node, mode="wrap").sum(axis=0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"feature": self.feature, "threshold": self.threshold, "left": self.left, "right": self.right,
                "value": self.value, "roots": self.roots, "depth": np.array(self.depth),
                "base": np.array(self.base)}

    @classmethod
    def from_arrays(cls, a: Any) -> TreeEnsemble:
        return cls(np.asarray(a["feature"], dtype=np.int32), np.asarray(a["threshold"], dtype=np.float64),
                   np.asarray(a["left"], dtype=np.int32), np.asarray(a["right"], dtype=np.int32),
                   np.asarray(a["value"], dtype=np.float64), np.asarray(a["roots"], dtype=np.int32),
                   int(a["depth"]), float(a["base"]))

    @classmethod
    def from_lightgbm(cls, dump: dict[str, Any]) -> TreeEnsemble:
        """From `Booster.dump_model()`: numerical `<=` splits only (our features have no NaN)."""
        feature: list[int] = []
        threshold: list[float] = []
        left: list[int] = []
        right: list[int] = []
        value: list[float] = []
        roots: list[int] = []
        depth = 1

        def add(node: dict[str, Any], d: int) -> int:
            nonlocal depth
            depth = max(depth, d)
            i = len(feature)
            feature.append(-1)
            threshold.append(0.0)
            left.append(i)
            right.append(i)
            value.append(0.0)
            if "leaf_value" in node or "split_feature" not in node:
                value[i] = float(node.get("leaf_value", 0.0))
                return i
            if node.get("decision_type", "<=") != "<=":
                raise ValueError(f"unsupported split {node.get('decision_type')!r}")
            feature[i] = int(node["split_feature"])
            threshold[i] = float(node["threshold"])
            left[i] = add(node["left_child"], d + 1)
            right[i] = add(node["right_child"], d + 1)
            return i

        for tree in dump["tree_info"]:
            roots.append(add(tree["tree_structure"], 1))
        return cls(np.array(feature, dtype=np.int32), np.array(threshold), np.array(left, dtype=np.int32),
                   np.array(right, dtype=np.int32), np.array(value), np.array(roots, dtype=np.int32), depth)


@dataclass
class TaskModel:
    """One task family's model: its feature names, trees and how its choice is made."""

    task: str
    features: tuple[str, ...]
    trees: TreeEnsemble
    blend_temperature: float = 0.2  # the chosen crop: candidates' boxes averaged, weights exp(raw / T)
    check_x: np.ndarray | None = None  # stored rows and the fitting code's outputs for them
    check_y: np.ndarray | None = None

    def raw(self, x: np.ndarray) -> np.ndarray:
        return self.trees.predict(x)

    @staticmethod
    def to_unit(raw: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(raw, -50, 50)))


@dataclass
class DefaultModel:
    """Both task families plus the metadata written at fit time."""

    tasks: dict[str, TaskModel]
    meta: dict[str, Any] = field(default_factory=dict)
    table: Any = field(default=None, repr=False, compare=False)  # a fitted model's own retrieval table

    def for_task(self, ratio: bool) -> TaskModel:
        return self.tasks["ratio" if ratio else "free"]

    def describe(self) -> str:
        cv = self.meta.get("cv", {})
        figs = ", ".join(f"{k} CV IoU {v.get('iou', 0):.3f}" for k, v in cv.items() if isinstance(v, dict))
        label = self.meta.get("label") or f"default model v{self.meta.get('version', '?')}"
        return f"{label} ({figs})" if figs else label


def save_model(model: DefaultModel, out: str | Path = MODEL_DIR) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    meta = dict(model.meta)
    meta["tasks"] = {}
    for name, tm in model.tasks.items():
        arrays = tm.trees.to_arrays()
        if tm.check_x is not None and tm.check_y is not None:
            arrays["check_x"] = tm.check_x.astype(np.float32)
            arrays["check_y"] = tm.check_y.astype(np.float64)
        np.savez_compressed(d / TASK_FILES[name], **arrays)
        meta["tasks"][name] = {"file": TASK_FILES[name], "features": list(tm.features),
                               "blend_temperature": tm.blend_temperature,
                               "trees": len(tm.trees.roots), "nodes": len(tm.trees.feature)}
    (d / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_model(d: str | Path = MODEL_DIR) -> DefaultModel:
    from cropper_engine.engine.features import CROP_FEATURES_VERSION
    from cropper_engine.errors import ModelNotFoundError

    p = Path(d)
    meta = json.loads((p / "model.json").read_text(encoding="utf-8"))
    if meta.get("features_version") != CROP_FEATURES_VERSION:
        raise ModelNotFoundError(
            f"the default model in {p} was fitted on features v{meta.get('features_version')} but this "
            f"code computes v{CROP_FEATURES_VERSION}; refit it: python -m cropper_engine.engine.fit_default "
            "--fcdb ../shared/data/fcdb")
    tasks = {}
    for name, t in meta["tasks"].items():
        f = p / t["file"]
        try:
            with np.load(f, allow_pickle=False) as a:
                trees = TreeEnsemble.from_arrays(a)
                cx = np.asarray(a["check_x"]) if "check_x" in a else None
                cy = np.asarray(a["check_y"]) if "check_y" in a else None
        except FileNotFoundError:
            raise ModelNotFoundError(f"the model in {p} has no {t['file']} (its {name} trees); refit it") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
            # a truncated or damaged .npz (a copy cut short, a full disk while fitting)
            raise ModelNotFoundError(f"the model in {p}: {t['file']} (its {name} trees) is damaged or truncated "
                                     f"({type(exc).__name__}: {exc}); refit it") from None
        tasks[name] = TaskModel(name, tuple(t["features"]), trees, float(t["blend_temperature"]), cx, cy)
    return DefaultModel(tasks, meta)


@lru_cache(maxsize=1)
def default_model() -> DefaultModel | None:
    """The shipped model, loaded once; None when the package has none (then the classical
    proposers and scorer run as before)."""
    if not (MODEL_DIR / "model.json").is_file():
        return None
    return read_model(MODEL_DIR)


__all__ = ["DefaultModel", "TaskModel", "TreeEnsemble", "default_model", "read_model", "save_model"]
