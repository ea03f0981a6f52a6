"""The no-VLM default: shipped table and model, numpy tree inference, constraints, exclusion."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cropper_engine.config import load_config
from cropper_engine.engine.loop import Cropper
from cropper_engine.types import Box, CropRequest, Ratio, Task


@pytest.fixture(scope="module")
def cropper():
    return Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none", "retrieval.embedder": "classical"}))


def test_shipped_assets_load():
    from cropper_engine.engine.features import CROP_FEATURES_VERSION, crop_feature_dict
    from cropper_engine.index.builtin import load_table, table_dir
    from cropper_engine.models.classical import CLASSICAL_ID
    from cropper_engine.models.default_model import MODEL_DIR, default_model

    table = load_table(CLASSICAL_ID)
    assert table is not None and len(table) == 1138 and not table.has_images()
    assert table.embedder_id == CLASSICAL_ID and table.manifest["source"]["split"] == "train"
    ex = table.example(0)
    assert ex.id.endswith(".jpg") and "/" not in ex.image_path and ex.crops
    size = sum(f.stat().st_size for d in (table_dir(CLASSICAL_ID), MODEL_DIR) for f in d.iterdir())
    assert size < 5e6  # a few MB at most
    model = default_model()
    assert model is not None and model.meta["features_version"] == CROP_FEATURES_VERSION
    assert set(model.tasks) == {"ratio", "free"}
    for task, tm in model.tasks.items():  # the model's features are exactly what the code computes
        from cropper_engine.engine.analysis import analyse
        from cropper_engine.engine.features import NeighbourCrops

        an = analyse(Image.new("RGB", (64, 48), (90, 120, 150)))
        names = crop_feature_dict(an, np.array([[0.1, 0.1, 0.9, 0.9]]), 1.0 if task == "ratio" else None,
                                  NeighbourCrops.empty())
        assert sorted(names) == sorted(tm.features)


def test_numpy_trees_match_the_fitting_code():
    from cropper_engine.models.default_model import default_model

    for tm in default_model().tasks.values():  # type: ignore[union-attr]
        assert tm.check_x is not None and len(tm.check_x) >= 8
        np.testing.assert_allclose(tm.raw(tm.check_x), tm.check_y, rtol=0, atol=1e-9)


def test_tree_ensemble_round_trip():
    from cropper_engine.models.default_model import TreeEnsemble

    # one stump: x0 <= 0.5 -> 1.0 else 2.0; one tree of depth 2 on x1
    dump = {"tree_info": [
        {"tree_structure": {"split_feature": 0, "threshold": 0.5, "decision_type": "<=",
                            "left_child": {"leaf_value": 1.0}, "right_child": {"leaf_value": 2.0}}},
        {"tree_structure": {"split_feature": 1, "threshold": 0.0, "decision_type": "<=",
                            "left_child": {"leaf_value": -1.0},
                            "right_child": {"split_feature": 0, "threshold": 0.25, "decision_type": "<=",
                                            "left_child": {"leaf_value": 10.0},
                                            "right_child": {"leaf_value": 20.0}}}},
    ]}
    t = TreeEnsemble.from_lightgbm(dump)
    x = np.array([[0.0, -1.0], [0.5, 1.0], [0.6, 1.0], [0.2, 0.5]])
    assert t.predict(x).tolist() == [0.0, 21.0, 22.0, 11.0]
    t2 = TreeEnsemble.from_arrays(t.to_arrays())
    assert t2.predict(x).tolist() == t.predict(x).tolist()


def test_builtin_table_never_returns_the_query_itself():
    from cropper_engine.engine.default_pipeline import model_neighbours
    from cropper_engine.index.builtin import load_table
    from cropper_engine.models.classical import CLASSICAL_ID

    table = load_table(CLASSICAL_ID)
    for row in range(0, len(table), 97):
        vec = np.asarray(table.vectors[row])
        own = table.example(row)
        hits = table.query(vec[None], 5)[0]
        assert hits[0].id == own.id  # without the exclusion it is its own nearest neighbour
        hits = table.query(vec[None], 30, exclude={own.id})[0]
        assert len(hits) == 30 and own.id not in {h.id for h in hits}
        nb = model_neighbours(table, vec, {own.id})
        unit = np.array(own.crops[0].to_unit(own.width, own.height))
        assert len(nb.boxes_unit) == 30 and not (np.abs(nb.boxes_unit - unit).max(1) < 1e-9).all()
        assert nb.similarity.max() < 0.9999


def test_eval_excludes_the_image_itself(fcdb):
    """An FCDB training image cropped under its own id: the model never sees its own crop."""
    from cropper_engine.engine.default_pipeline import retrieve_for_model
    from cropper_engine.imageio import open_image
    from cropper_engine.index.builtin import load_table
    from cropper_engine.models.classical import CLASSICAL_ID, ClassicalEmbedder

    table = load_table(CLASSICAL_ID)
    row = json.loads((fcdb / "train.jsonl").read_text().splitlines()[0])
    img = open_image(fcdb / "images" / row["image"])
    req = CropRequest(img.path, Task.FREE, id=row["image"])
    emb = ClassicalEmbedder()
    hits = {0: table.query(emb.embed([img.image]), 30, exclude={row["image"]})[0]}
    for index in (table, None):  # the engine's own classical index, or the built-in table
        got = retrieve_for_model(index, emb, hits, [req], [img], [0], None)[0]
        assert got.crops.similarity.max() < 0.999
        assert len(got.crops.boxes_unit) == 30


def _image(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(w * 31 + h)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, 90)], -1).astype(np.float64)
    a[h // 3: h // 2, w // 2: 3 * w // 4] = (240, 30, 30)  # a red object
    a += rng.normal(0, 8, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(1024, 683), (600, 800), (300, 300)])
def test_ratio_crops_have_the_exact_ratio(cropper, size):
    img = _image(*size)
    ratios = ["1:1", "16:9", "4:5", "3:2"]
    out = cropper.crop_batch([CropRequest(img, Task.RATIO, ratios)])[0]
    assert [str(r.ratio) for r in out] == ratios
    for r in out:
        b = r.box
        assert r.pipeline == "no-vlm" and 0 <= b.x1 < b.x2 <= size[0] and 0 <= b.y1 < b.y2 <= size[1]
        assert b.as_list() == b.rounded().as_list()  # whole pixels: what is returned is what was chosen
        ratio = Ratio.parse(str(r.ratio)).value
        assert abs(b.width / b.height - ratio) <= ratio / min(b.width, b.height) + 1e-9  # within a pixel
        if str(r.ratio) == "1:1":
            assert b.width == b.height
        assert r.candidates[0].source.startswith("default-blend") and r.score == r.candidates[0].score
        assert r.score == max(c.score for c in r.candidates)


def test_free_form_is_not_the_full_image(cropper, photos):
    outs = cropper.crop_batch([CropRequest(p, Task.FREE) for p in photos])
    boxes = [o[0].box for o in outs]
    assert all(b.is_valid() for b in boxes)
    assert any(b.area < 0.97 * o[0].width * o[0].height for b, o in zip(boxes, outs, strict=True))
    sources = {c.source for o in outs for c in o[0].candidates}
    assert {"grid", "neighbour"} <= sources


def test_subject_crops_contain_the_mask(cropper):
    img = _image(800, 600)
    for box in [(20, 30, 120, 200), (600, 400, 799, 599), (300, 0, 500, 600)]:
        m = np.zeros((600, 800), bool)
        m[box[1]:box[3], box[0]:box[2]] = True
        r = cropper.crop_batch([CropRequest(img, Task.SUBJECT, mask=m)])[0][0]
        ys, xs = np.nonzero(m)  # the mask's own pixels, not the engine's subject_box
        x1, y1, x2, y2 = int(r.box.x1), int(r.box.y1), int(r.box.x2), int(r.box.y2)
        assert m[y1:y2, x1:x2].sum() == m.sum(), (r.box, box)  # every subject pixel inside the crop
        assert x1 <= xs.min() and y1 <= ys.min() and x2 >= xs.max() + 1 and y2 >= ys.max() + 1, (r.box, box)
        for c in r.candidates:
            cx1, cy1, cx2, cy2 = (int(round(v)) for v in c.box.as_list())
            assert m[max(cy1, 0):cy2, max(cx1, 0):cx2].sum() == m.sum(), (c.box, box)


def test_timings_and_describe(cropper):
    r = cropper.crop_batch([CropRequest(_image(640, 480), Task.RATIO, ["4:3"])])[0][0]
    assert {"decode", "embed", "retrieve", "analyse", "propose"} <= set(r.timings)
    assert "built-in table" in cropper.describe()["reasons"]["index"]


def test_with_clip_weights_the_model_shortlist_is_reranked(tiny_dir, photos):
    """CLIP present (tiny random weights here): the model's shortlist is re-scored with CLIP."""
    from cropper_engine.models.embedders import load_embedder

    clip = load_embedder(f"open_clip-dir:{tiny_dir / 'clip' / 'open_clip'}", device="cpu")
    c = Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"}), embedder=clip)
    out = c.crop_batch([CropRequest(photos[0], Task.RATIO, ["1:1"]), CropRequest(photos[1], Task.FREE)])
    for res in out:
        r = res[0]
        assert r.candidates[0].source == "default-clip" and "clip" in r.candidates[0].scores
        assert r.score == max(x.score for x in r.candidates)
    assert out[0][0].box.width == out[0][0].box.height


def test_fitting_rows_are_what_the_model_reads(fcdb):
    """The fitting code's rows (2 training images, no LightGBM needed): the shipped model's
    features, targets in 0..1, mirrors kept apart, and the image never among its neighbours."""
    from cropper_engine.engine.fit_default import build_rows
    from cropper_engine.models.default_model import default_model

    rows = build_rows(fcdb, mirror=True, jobs=1, limit=2)
    model = default_model()
    for task, r in rows.items():
        assert tuple(r.names) == model.tasks[task].features  # type: ignore[union-attr]
        assert r.x.shape == (len(r.y), len(r.names)) and np.isfinite(r.x).all()
        assert r.y.min() >= 0.0 and r.y.max() <= 1.0 and r.y.max() > 0.8  # a candidate near the truth
        assert set(r.group.tolist()) == {0, 1, 2, 3} and set(r.image.tolist()) == {0, 1}
        assert r.x[:, r.names.index("nb_sim")].max() < 0.999


def test_face_features_of_candidate_crops():
    """features.face_feature_dict (studied by CV, not in the shipped model): which faces are inside,
    where the largest sits, and the no-face values."""
    from cropper_engine.engine.features import NO_FACE, face_feature_dict

    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0], [0.15, 0.1, 0.35, 0.5]])
    faces = np.array([[0.2, 0.2, 0.3, 0.3], [0.6, 0.2, 0.62, 0.22]])  # a main face and a small one
    d = face_feature_dict(boxes, faces)
    assert d["face_n"].tolist() == [2, 2, 2]
    assert d["face_in"].tolist() == [1.0, 0.5, 0.5] and d["face_main_in"].tolist() == [1.0, 0.0, 1.0]
    assert d["face_cut"].tolist() == [0, 0, 0]
    assert d["face_dx"][2] == pytest.approx(0.0) and d["face_top"][2] == pytest.approx(0.25)
    none = face_feature_dict(boxes, np.zeros((0, 4)))
    assert none["face_n"].tolist() == [0, 0, 0] and (none["face_dx"] == NO_FACE).all()


def _walk(tm, row: np.ndarray) -> float:
    """One row through every tree, node by node, as LightGBM does: float32 features, float64 thresholds."""
    t = tm.trees
    x = np.asarray(row, dtype=np.float32).astype(np.float64)
    out = t.base
    for root in t.roots:
        i = int(root)
        while t.feature[i] >= 0:
            i = int(t.left[i]) if x[t.feature[i]] <= t.threshold[i] else int(t.right[i])
        out += t.value[i]
    return out


def test_vectorised_trees_take_the_same_branches_at_the_thresholds():
    """The float32 comparisons of TreeEnsemble.predict give the leaves a float64 walk gives, also
    for features equal to a threshold or one float32 step either side of it."""
    from cropper_engine.models.default_model import default_model

    rng = np.random.default_rng(0)
    for tm in default_model().tasks.values():  # type: ignore[union-attr]
        t = tm.trees
        rows = np.repeat(tm.check_x[:4], 60, axis=0).astype(np.float32)
        splits = np.flatnonzero(t.feature >= 0)
        for k, node in enumerate(rng.choice(splits, len(rows))):
            v = np.float32(t.threshold[node])
            v = [v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))][k % 3]
            rows[k, t.feature[node]] = v
        want = np.array([_walk(tm, r) for r in rows])
        np.testing.assert_allclose(tm.raw(rows), want, rtol=0, atol=1e-9)


def test_box_lookup_sums_the_map():
    """BoxLookup (every map's box sums at once) gives each box's share of the map: exact on pixel edges."""
    from cropper_engine.engine.analysis import BoxLookup, MapTable

    rng = np.random.default_rng(1)
    m = rng.random((30, 40))
    t = MapTable.from_map(m, moments=True)
    edges = np.array([[0, 0, 40, 30], [5, 3, 17, 29], [39, 0, 40, 1], [10, 10, 10, 20]])
    boxes = edges / np.array([40, 30, 40, 30])
    look = BoxLookup(boxes, t.h, t.w)
    want = np.array([m[y1:y2, x1:x2].sum() / m.sum() for x1, y1, x2, y2 in edges])
    np.testing.assert_allclose(look.mass(t.sat), want, atol=1e-12)
    np.testing.assert_array_equal(look.mass(t.sat), t.mass(boxes))
    xs = (np.arange(40) + 0.5) / 40
    want_x = np.array([(m * xs)[y1:y2, x1:x2].sum() / m.sum() for x1, y1, x2, y2 in edges])
    np.testing.assert_allclose(look.mass(t.sat_x), want_x, atol=1e-12)


def test_repeated_candidates_are_scored_once_with_the_same_scores():
    from cropper_engine.engine.analysis import analyse
    from cropper_engine.engine.default_pipeline import rank
    from cropper_engine.engine.features import NeighbourCrops, crop_features
    from cropper_engine.models.default_model import default_model

    tm = default_model().for_task(True)  # type: ignore[union-attr]
    an = analyse(_image(400, 300))
    rng = np.random.default_rng(2)
    c = rng.uniform(0.3, 0.7, (40, 2))
    boxes = np.concatenate([c - 0.2, c + 0.2], axis=1)
    boxes = np.concatenate([boxes, boxes[:10], boxes[3:5]])  # repeats, as constraints make them
    calls = []
    raw_of = tm.raw

    class Counting:
        features, blend_temperature = tm.features, tm.blend_temperature

        def raw(self, x):
            calls.append(len(x))
            return raw_of(x)

    ranked = rank(Counting(), an, boxes, ["grid"] * len(boxes), 4 / 3, NeighbourCrops.empty())
    assert calls == [40]
    alone = raw_of(crop_features(an, boxes, 4 / 3, NeighbourCrops.empty(), tm.features))
    order = np.argsort(-alone, kind="stable")
    np.testing.assert_array_equal(ranked.raw, alone[order])
    np.testing.assert_array_equal(ranked.boxes_unit, boxes[order])


def test_snapping_to_pixels_keeps_the_ratio_and_the_image_edges():
    """Whole pixels, the integer size nearest the ratio, and a box on an image edge stays on it
    (FCDB 9607029021: a face touching the top edge was cut by the 1 px the rounding moved)."""
    from cropper_engine.engine.default_pipeline import snap_to_pixels

    cases = [(Box(0.3, 20.2, 300.6, 320.9), 1.0), (Box(100.2, 75.3, 799.8, 600.0), 4 / 3),
             (Box(10.4, 10.6, 410.1, 235.7), 16 / 9)]
    for h in np.arange(500.0, 560.0, 0.37):  # 9:16 boxes in the top right corner, as around that face
        w = h * 9 / 16
        cases.append((Box(800.0 - w, 0.0, 800.0, h), 9 / 16))
    for box, ratio in cases:
        s = snap_to_pixels(box, ratio, 800, 600)
        assert all(float(v).is_integer() for v in s.as_list())
        assert abs(np.log(s.aspect / ratio)) < 0.01 and abs(s.width - box.width) <= 2
        assert min(s.x1, s.y1) >= 0 and s.x2 <= 800 and s.y2 <= 600
        for near, edge in ((box.x1 <= 0.5, s.x1 == 0), (box.y1 <= 0.5, s.y1 == 0),
                           (box.x2 >= 799.5, s.x2 == 800), (box.y2 >= 599.5, s.y2 == 600)):
            assert edge or not near, (box, s)
        assert abs(s.center[0] - box.center[0]) <= 2.5 and abs(s.center[1] - box.center[1]) <= 2.5


def test_faces_are_detected_beside_the_rest_and_a_failure_stays_with_its_image(cropper, photos, monkeypatch):
    """Without a VLM the faces to keep whole are detected in a worker thread while the engine
    embeds, retrieves and analyses; the crops get them all the same (the astronaut keeps her
    face at 16:9), and a detection that fails is that request's error, the others go on."""
    import threading

    import cropper_engine.engine.subject as subject
    from cropper_engine.errors import InputError

    real = subject.resolve_subject
    threads = []

    def resolve(spec, image, keep=None):
        threads.append(threading.current_thread().name)
        if getattr(image, "path", "").endswith("coffee.jpg"):
            raise InputError("coffee.jpg: a test double's detector failure")
        return real(spec, image, keep)

    monkeypatch.setattr(subject, "resolve_subject", resolve)
    astronaut = next(p for p in photos if p.name == "astronaut.jpg")
    coffee = next(p for p in photos if p.name == "coffee.jpg")
    out = cropper.crop_batch([CropRequest(str(astronaut), Task.RATIO, ["16:9"], keep_faces=True),
                              CropRequest(str(coffee), Task.RATIO, ["16:9", "1:1"], keep_faces=True)])
    assert threads and all(name.startswith("cropper-faces") for name in threads)
    assert isinstance(out[1], InputError) and "detector failure" in str(out[1])
    r = out[0][0]
    face = Box(*r.extra["faces"][0]["box"])
    assert r.box.contains(face, tol=1.0) and abs(r.box.aspect - 16 / 9) < 0.01


def test_many_candidates_are_scored_in_two_halves_with_the_same_result():
    import threading

    from cropper_engine.engine.default_pipeline import PARALLEL_ROWS, model_raw
    from cropper_engine.models.default_model import default_model

    tm = default_model().for_task(False)  # type: ignore[union-attr]
    rng = np.random.default_rng(5)
    x = tm.check_x[rng.integers(0, len(tm.check_x), PARALLEL_ROWS + 61)]
    x = x * (1 + 0.05 * rng.standard_normal(x.shape))
    seen = []

    class Recording:
        def raw(self, rows):
            seen.append((threading.current_thread().name, len(rows)))
            return tm.raw(rows)

    got = model_raw(Recording(), x)
    np.testing.assert_array_equal(got, tm.raw(x))  # bit for bit
    if (os.cpu_count() or 1) >= 2:  # one core: scored in one go
        assert sorted(n for _, n in seen) == [len(x) // 2, len(x) - len(x) // 2]
        assert any(name.startswith("cropper-trees") for name, _ in seen)
