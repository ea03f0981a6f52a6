"""The ranker study's tried features and within-image z-scores (bench/studies/extra_features.py,
bench/studies/ranker_study.py): what they compute, on small known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from needs import need_module
from PIL import Image

from bench.studies.extra_features import features, mass_box
from bench.studies.ranker_study import _zscores
from cropper_engine.engine.fit_default import Rows


def test_mass_box_holds_the_central_share_of_a_maps_mass():
    m = np.zeros((100, 100))
    m[20:40, 60:90] = 1.0  # all the mass in x 0.6..0.9, y 0.2..0.4
    b = mass_box(m, 0.05)
    assert b[0] == pytest.approx(0.615, abs=0.011) and b[2] == pytest.approx(0.885, abs=0.011)
    assert b[1] == pytest.approx(0.21, abs=0.011) and b[3] == pytest.approx(0.39, abs=0.011)
    assert (mass_box(m, 0.15)[2] - mass_box(m, 0.15)[0]) < (b[2] - b[0])  # 70 % of the mass: a smaller box


def test_tried_features_see_a_cut_off_frame():
    # a grey photo in a white frame 10 % wide: a crop inside the frame has strips of another colour
    # on all four sides; the whole image has no strips at all
    a = np.full((200, 300, 3), 255, np.uint8)
    a[20:180, 30:270] = (90, 110, 70)
    a[80:120, 120:180] = (200, 40, 40)  # a red subject in the middle
    img = Image.fromarray(a)
    boxes = np.array([[0.1, 0.1, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0], [0.4, 0.4, 0.6, 0.6]])
    f = features(img, boxes)
    assert set(len(v) for v in f.values()) == {3}
    assert min(f[f"c_dE{s}"][0] for s in "LRTB") > 0.3  # white against dark green
    assert all(f[f"c_dE{s}"][1] == -1.0 for s in "LRTB")  # on the image edges: no strip
    assert f["c_stdL"][0] < 0.02  # the frame is uniform
    assert f["mb_ft90_hold"][1] == pytest.approx(1.0)  # the whole image holds every mass box
    plain = np.full((200, 300, 3), 120, np.uint8)
    plain[80:120, 120:180] = (200, 40, 40)  # no frame: the colour saliency's mass centres on the red patch
    g = features(Image.fromarray(plain), boxes)
    for tag in ("90", "70"):  # the patch's box is centred in the mass box: equal offsets either side
        assert g[f"mb_ft{tag}_dx1"][2] == pytest.approx(-g[f"mb_ft{tag}_dx2"][2], abs=0.01)
        assert g[f"mb_ft{tag}_dy1"][2] == pytest.approx(-g[f"mb_ft{tag}_dy2"][2], abs=0.01)
    assert g["mb_ft70_hold"][2] < g["mb_ft90_hold"][0] < g["mb_ft90_hold"][1] == pytest.approx(1.0)
    assert g["g_ft_top10"][0] > 0.5  # concentrated: most of the map in a tenth of the cells


def test_zscores_are_within_each_image():
    x = np.array([[1, 5], [3, 5], [10, 7], [20, 9]], np.float32)  # col 1 constant in image 0, not in 1
    r = Rows(x, np.zeros(4), np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), np.zeros((4, 4)), np.zeros((2, 4)),
             ["a", "b"])
    z = _zscores(r)
    assert z.names == ["a", "b", "z_a"]  # b varies in only half the images: not added
    assert z.x[:, 2] == pytest.approx([-1, 1, -1, 1])


def test_every_set_up_runs_its_cv_in_the_worker_pool():
    need_module("lightgbm", "LightGBM (the fit extra)")
    from bench.studies.ranker_study import SHIPPED, setups

    rng = np.random.default_rng(0)
    groups, per = 40, 200  # the CV fits on 15 % of the rows, at least 100 a leaf
    group = np.repeat(np.arange(groups), per)
    image = group % (groups // 2)  # the second half: the first half's mirror images
    boxes = np.sort(rng.random((groups * per, 2, 2)), axis=1).transpose(0, 2, 1).reshape(-1, 4)[:, [0, 2, 1, 3]]
    gt = np.tile([0.1, 0.1, 0.9, 0.9], (groups, 1))
    from cropper_engine.engine.features import _iou_unit

    y = _iou_unit(boxes, gt[:1])
    x = np.stack([y + rng.normal(0, 0.05, len(y)), rng.random(len(y))], 1).astype(np.float32)  # one honest feature
    r = Rows(x, y, group, image, boxes, gt, ["signal", "noise"])
    extra = (rng.random((len(y), 2)).astype(np.float32), ["e1", "e2"])
    seen: list[str] = []
    out, oof, temperature = setups(r, "ratio", seen.append, extra, jobs=2)
    assert len(out) == 13 and SHIPPED in out and len(seen) == 13
    assert out["features: without the neighbours' crops (nb_*)"] > 0  # no such features here: the same rows
    assert oof.shape == y.shape and np.corrcoef(oof, y)[0, 1] > 0.5  # the shipped set-up's out-of-fold scores
    assert temperature > 0
    assert all(0 < v <= 1 for v in out.values())
