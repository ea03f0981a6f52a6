"""Scoring candidate crops the paper's way: aesthetics, content preservation (CLIP), area.

`FusedScorer` scores all candidates of all images of a batch in ONE forward pass:
- prepare (CPU): each image -> a uint8 tensor, boxes -> unit coordinates;
- forward (device): every image is resized (antialiased) onto a square canvas, the canvases
  sit side by side in one wide tensor, and one `grid_sample` cuts every crop and every full image
  to the embedder's input size with their aspect kept, as retrieval preprocesses an image (CLIP's
  resize of the shorter side and centre crop: the centre square of the crop, in pixels); one
  embedder pass embeds them all; the aesthetic head reads the same embeddings;
- finish (CPU): per-term scores in 0..1 and their weighted mean, with the weights of each
  image's task (`scoring.free / subject / ratio`).
The terms: `aesthetic` (a LAION aesthetic head on the crop's CLIP embedding, 1..10 mapped to
0..1), `clip` (cosine similarity of the crop's and the whole image's CLIP embeddings, clipped to
0..1), `area` (crop area / image area, 0..1). A term whose model is missing (no CLIP weights, no
aesthetic head) is replaced by `classical`, the composition score (saliency / layout features
through a logistic, 0..1), which takes the missing terms' weights and is named a stand-in wherever
its score is shown (`describe`, `prompt_words`); random weights never score. The weights per task
are config data (config.ScoringConfig, the paper's choice per task).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.engine.features import FEATURE_NAMES, SaliencyTable, box_features
from cropper_engine.errors import ModelNotFoundError
from cropper_engine.types import Box

CANVAS_FACTOR = 2  # canvas side = factor x embedder input size: crops >= half the image stay sharp


def crop_grid(boxes_unit: Any, size: int, canvas_index: Any, n_canvases: int, canvas_width: int) -> Any:
    """Sampling grid [1, M*size, size, 2] for `grid_sample` over canvases laid side by side.

    boxes_unit: torch [M, 4] in 0..1 of each box's own canvas; canvas_index: torch [M] the canvas
    each box belongs to. Each canvas is `canvas_width` pixels wide plus one replicated column on
    either side, so a crop at a canvas' edge samples that edge, never the neighbouring canvas.
    """
    import torch

    m = boxes_unit.shape[0]
    t = (torch.arange(size, device=boxes_unit.device, dtype=boxes_unit.dtype) + 0.5) / size  # [S]
    x1, y1, x2, y2 = boxes_unit.unbind(1)
    xs = x1[:, None] + (x2 - x1)[:, None] * t[None, :]  # [M, S] in the canvas' unit coords
    ys = y1[:, None] + (y2 - y1)[:, None] * t[None, :]
    padded = canvas_width + 2
    xs = (canvas_index[:, None] * padded + 1 + xs * canvas_width) / (n_canvases * padded)
    gx = xs * 2 - 1
    gy = ys * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [M, S, S, 2]
    return grid.reshape(1, m * size, size, 2)


def centre_square(boxes_unit: np.ndarray, width: int, height: int) -> np.ndarray:
    """Each box's centred square (side: its shorter side in pixels), in unit coordinates: what
    CLIP's preprocessing (shorter side resized, centre crop) keeps of a crop, without squashing it."""
    u = np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4)
    cx, cy = (u[:, 0] + u[:, 2]) / 2, (u[:, 1] + u[:, 3]) / 2
    side = np.minimum((u[:, 2] - u[:, 0]) * width, (u[:, 3] - u[:, 1]) * height)
    hw, hh = side / 2 / width, side / 2 / height
    return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1)


def cut_and_resize(canvases: Any, boxes_unit: Any, canvas_index: Any, size: int) -> Any:
    """All crops from canvases [B, 3, C, C] -> [M, 3, size, size] with one grid_sample."""
    import torch.nn.functional as F

    b, c, hc, wc = canvases.shape
    padded = F.pad(canvases, (1, 1, 0, 0), mode="replicate")
    wide = padded.permute(1, 2, 0, 3).reshape(1, c, hc, b * (wc + 2))  # canvases side by side
    grid = crop_grid(boxes_unit, size, canvas_index.to(boxes_unit.dtype), b, wc)
    out = F.grid_sample(wide, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(c, boxes_unit.shape[0], size, size).permute(1, 0, 2, 3)


class AestheticHead:
    """The LAION aesthetic predictor on CLIP image embeddings (linear or MLP), from a local file.

    Formats: the original linear head (state dict `weight` [1, D], `bias` [1]) and the
    "improved aesthetic predictor" MLP (`layers.0.weight` ... `layers.7.weight`), as .pth or
    .safetensors. Output ~1..10; `score` maps it to 0..1.
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        import torch

        p = Path(path)
        if not p.is_file():
            raise ModelNotFoundError(
                f"aesthetic head {p} not found; download the LAION aesthetic predictor "
                "(e.g. sa_0_4_vit_b_32_linear.pth for ViT-B-32) and pass its path"
            )
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        if "state_dict" in state:
            state = state["state_dict"]
        self.path = str(p)
        layers: list[Any] = []
        if "weight" in state and "bias" in state:
            lin = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
            lin.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
            layers = [lin]
        else:
            keys = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")},
                          key=lambda k: int(k.split(".")[-1]))
            if not keys:
                raise ModelNotFoundError(f"{p} is not a LAION aesthetic predictor state dict")
            for k in keys:
                w = state[f"{k}.weight"]
                lin = torch.nn.Linear(w.shape[1], w.shape[0])
                lin.load_state_dict({"weight": w, "bias": state[f"{k}.bias"]})
                layers.append(lin)
        self.net = torch.nn.Sequential(*layers).to(device).eval()
        self.dim = layers[0].in_features

    def __call__(self, emb: Any) -> Any:
        return self.net(emb.to(next(self.net.parameters()).dtype)).squeeze(-1)

    @staticmethod
    def to_unit(raw: np.ndarray) -> np.ndarray:
        return np.clip((raw - 1.0) / 9.0, 0.0, 1.0)


# hand-set composition weights over FEATURE_NAMES; a fitted model replaces them when present
DEFAULT_CLASSICAL_WEIGHTS = {
    "mass": 1.0, "density": 0.15, "border": -0.25, "outside_peak": -0.5, "com_dx": -0.6,
    "com_dy": -0.6, "area": 0.5, "log_aspect_change": -0.2,
}


@dataclass
class ClassicalScorer:
    """Composition score from saliency features: a linear model, 0..1 through a logistic."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CLASSICAL_WEIGHTS))
    bias: float = 0.0

    def score(self, feats: np.ndarray) -> np.ndarray:
        w = np.array([self.weights.get(n, 0.0) for n in FEATURE_NAMES])
        f = feats.copy()
        i_dx, i_dy = FEATURE_NAMES.index("com_dx"), FEATURE_NAMES.index("com_dy")
        f[:, i_dx] = np.abs(f[:, i_dx])
        f[:, i_dy] = np.abs(f[:, i_dy])
        z = f @ w + self.bias
        return 1.0 / (1.0 + np.exp(-z))


@dataclass
class Prepared:
    images: list[Any]  # uint8 tensors [3, H, W] (CPU)
    boxes_unit: list[np.ndarray]  # per image [M_i, 4]
    sizes: list[tuple[int, int]]
    features: list[np.ndarray]  # classical features per image [M_i, F]


@dataclass
class ScoreOutput:
    """Per image: total scores [M_i] and component scores name -> [M_i], all in 0..1."""

    total: list[np.ndarray]
    components: list[dict[str, np.ndarray]]


TERMS = ("aesthetic", "clip", "area")
_WORDS = {"aesthetic": "aesthetics", "clip": "content kept", "area": "area"}
TASKS = ("free", "subject", "ratio")


def _task_key(task: Any) -> str:
    v = getattr(task, "value", task)
    return v if v in TASKS else "free"


class FusedScorer:
    """Weighted mean of the paper's terms (aesthetic, clip, area) with per-task weights;
    `classical` (composition) stands in for a term whose model is missing."""

    def __init__(self, embedder: Any | None = None, aesthetic: AestheticHead | None = None,
                 *, task_weights: Mapping[str, Any] | None = None, classical_weight: float = 1.0,
                 classical: ClassicalScorer | None = None, saliency_size: int = 64) -> None:
        """task_weights: {task: {"aesthetic", "clip", "area"} or an object with those attributes}
        (config.TermWeights); tasks left out take the config's defaults (config.ScoringConfig: the
        paper's terms per task). classical_weight: the no-VLM default's model weight in its CLIP
        re-rank (`weights`)."""
        from cropper_engine.config import ScoringConfig

        self.embedder = embedder if embedder is not None and hasattr(embedder, "encode_pixels") else None
        self.aesthetic = aesthetic if self.embedder is not None else None
        self.classical = classical or ClassicalScorer()
        self.saliency_size = saliency_size
        self._images: OrderedDict[int, tuple[Any, Any, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        given = dict(task_weights or {})
        defaults = ScoringConfig()
        self.task_weights: dict[str, dict[str, float]] = {}
        self.stand_in_for: dict[str, list[str]] = {}  # per task: the terms `classical` stands in for
        for task in TASKS:
            w = given.get(task, getattr(defaults, task))
            raw = {t: float(w[t] if isinstance(w, Mapping) else getattr(w, t)) for t in TERMS}
            self.task_weights[task] = self._effective(raw)
            self.stand_in_for[task] = [t for t in TERMS if raw[t] > 0 and not self._present(t)]
        # the no-VLM default's CLIP re-rank (engine/default_pipeline.py): its fitted model, CLIP
        # similarity and aesthetics (where their models are here), weighed equally; not the VLM
        # loop's per-task weights
        self.weights = {"classical": classical_weight, "area": 1.0,
                        **{t: 1.0 for t in ("clip", "aesthetic") if self._present(t)}}

    def _present(self, term: str) -> bool:
        return {"area": True, "clip": self.embedder is not None, "aesthetic": self.aesthetic is not None}[term]

    def _effective(self, raw: dict[str, float]) -> dict[str, float]:
        out = {t: raw[t] for t in TERMS if self._present(t) and raw[t] > 0}
        missing = sum(raw[t] for t in TERMS if not self._present(t))
        if missing > 0:
            out["classical"] = missing
        return out

    def prompt_words(self, task: Any) -> str:
        """What a score of `task` measures, in words for the refinement prompt: the stand-in named."""
        key = _task_key(task)
        weights = self.task_weights[key]
        words = []
        for term in ("aesthetic", "clip", "area"):
            if term in weights:
                words.append(_WORDS[term])
        if "classical" in weights:
            stands = " and ".join(_WORDS[t] for t in self.stand_in_for[key])
            words.insert(0, f"a composition estimate (standing in for {stands})")
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]

    def weights_for(self, task: Any) -> dict[str, float]:
        """The weights the total of a candidate of `task` uses (term -> weight)."""
        return self.task_weights[_task_key(task)]

    @property
    def components(self) -> list[str]:
        return sorted({k for w in self.task_weights.values() for k in w})

    @property
    def _composition(self) -> bool:
        return any("classical" in w for w in self.task_weights.values())

    def describe(self) -> str:
        views = {t: " + ".join(f"{v:g}*{k}" for k, v in sorted(w.items())) for t, w in self.task_weights.items()}
        text = views["free"] if len(set(views.values())) == 1 else "; ".join(f"{t}: {v}" for t, v in views.items())
        missing = [m for t, m in (("aesthetic", "aesthetic head"), ("clip", "CLIP weights")) if not self._present(t)]
        if any("classical" in w for w in self.task_weights.values()):
            text += f" (classical: the composition stand-in, for no {' and no '.join(missing)} here)"
        return text

    # -- the three stages ----------------------------------------------------------------
    def prepare(self, images: Sequence[Any], boxes: Sequence[Sequence[Box]],
                saliency: Sequence[np.ndarray] | None = None) -> Prepared:
        tens, units, sizes, feats = [], [], [], []
        for i, (img, bxs) in enumerate(zip(images, boxes, strict=True)):
            w, h = img.size
            sizes.append((w, h))
            u = np.array([b.to_unit(w, h) for b in bxs], dtype=np.float64).reshape(-1, 4)
            units.append(u)
            per = self._per_image(img, saliency[i] if saliency is not None else None)
            if self._composition:
                feats.append(box_features(per["table"], u, w / h))
            else:
                feats.append(np.zeros((len(u), len(FEATURE_NAMES))))
            if self.embedder is not None:
                tens.append(per["canvas"])
        return Prepared(tens, units, sizes, feats)

    def _per_image(self, img: Any, sal: np.ndarray | None) -> dict[str, Any]:
        """What scoring needs of an image whatever the boxes (its saliency table, its canvas),
        made once: each refinement round scores new boxes on the same images. Entries hold the
        image weakly (a photo can be large); one whose image is gone never matches again."""
        import weakref

        key = id(img)
        with self._lock:
            hit = self._images.get(key)
            if hit is not None and hit[0]() is img and (sal is None or hit[1] is sal):
                self._images.move_to_end(key)
                return hit[2]
        from cropper_engine.models.saliency import spectral_residual_saliency

        w, h = img.size
        per: dict[str, Any] = {}
        if self._composition:
            if sal is None:
                sal = spectral_residual_saliency(
                    np.asarray(img.convert("L").resize(_small(w, h)), dtype=np.float32), self.saliency_size)
            per["table"] = SaliencyTable.from_map(sal)
        if self.embedder is not None:
            import torch

            side = CANVAS_FACTOR * self.embedder.input_size
            canvas = img.resize((side, side), _bilinear(), reducing_gap=3.0) if max(w, h) > 4 * side else img
            per["canvas"] = torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy()).permute(2, 0, 1)
        with self._lock:
            self._images[key] = (weakref.ref(img), sal, per)
            if len(self._images) > 64:
                self._images.popitem(last=False)
        return per

    def forward(self, prep: Prepared) -> dict[str, Any]:
        if self.embedder is None or not any(len(u) for u in prep.boxes_unit):
            return {}
        import torch

        emb = self.embedder
        dev = emb.device
        side = CANVAS_FACTOR * emb.input_size
        with torch.inference_mode():
            canvases = torch.stack([
                torch.nn.functional.interpolate(t.to(dev)[None].float() / 255.0, size=(side, side),
                                                mode="bilinear", antialias=True, align_corners=False)[0]
                for t in prep.images
            ])
            boxes, index = [], []
            for i, (u, (w, h)) in enumerate(zip(prep.boxes_unit, prep.sizes, strict=True)):
                # the full image and each crop, their aspect kept (the centre square, as retrieval)
                both = np.concatenate([[[0.0, 0.0, 1.0, 1.0]], u]) if len(u) else np.array([[0.0, 0.0, 1.0, 1.0]])
                boxes.append(torch.as_tensor(centre_square(both, w, h), dtype=torch.float32))
                index.extend([i] * (len(u) + 1))
            bt = torch.cat(boxes).to(dev)
            it = torch.tensor(index, device=dev)
            pixels = cut_and_resize(canvases, bt, it, emb.input_size)
            vecs = emb.encode_pixels(pixels)
            out = {"emb": vecs, "index": it}
            if self.aesthetic is not None:
                out["aesthetic_raw"] = self.aesthetic(vecs)
        return out

    def finish(self, prep: Prepared, out: dict[str, Any], tasks: Sequence[Any] | None = None) -> ScoreOutput:
        totals, comps = [], []
        emb = out["emb"].float().cpu().numpy() if out else None
        aes = out["aesthetic_raw"].float().cpu().numpy() if out and "aesthetic_raw" in out else None
        pos = 0
        for i, (u, f) in enumerate(zip(prep.boxes_unit, prep.features, strict=True)):
            m = len(u)
            weights = self.weights_for(tasks[i] if tasks is not None else "free")
            c: dict[str, np.ndarray] = {"area": (u[:, 2] - u[:, 0]) * (u[:, 3] - u[:, 1])}
            if self._composition:
                c["classical"] = self.classical.score(f) if m else np.zeros(0)
            if emb is not None:
                full, crops = emb[pos], emb[pos + 1:pos + 1 + m]
                c["clip"] = np.clip(crops @ full, 0.0, 1.0)
                if aes is not None:
                    c["aesthetic"] = AestheticHead.to_unit(aes[pos + 1:pos + 1 + m])
                pos += m + 1
            wsum = sum(weights.values()) or 1.0
            total = sum(weights[k] * c[k] for k in weights if k in c) / wsum
            totals.append(np.asarray(total, dtype=np.float64).reshape(m))
            comps.append(c)
        return ScoreOutput(totals, comps)

    def score(self, images: Sequence[Any], boxes: Sequence[Sequence[Box]],
              saliency: Sequence[np.ndarray] | None = None, tasks: Sequence[Any] | None = None) -> ScoreOutput:
        """tasks: each image's task (Task or its name), which picks its weights; default free."""
        prep = self.prepare(images, boxes, saliency)
        return self.finish(prep, self.forward(prep), tasks)


def _small(w: int, h: int, side: int = 160) -> tuple[int, int]:
    s = side / max(w, h)
    return max(8, round(w * s)), max(8, round(h * s))


def _bilinear() -> Any:
    from PIL import Image

    return Image.Resampling.BILINEAR
