"""Metrics against hand-computed values, and on the 3 real GAICD images."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from cropper_engine.data.metrics import (
    RANKING_KEYS,
    MetricAccumulator,
    acc_k_n,
    alpha_recall,
    best_gt,
    disp,
    iou,
    pcc,
    ranking_metrics,
    srcc,
)
from cropper_engine.errors import InputError
from cropper_engine.types import Box

GAICD = Path(__file__).resolve().parents[2] / "shared" / "data" / "gaicd"  # ../shared/data beside the checkout


def test_iou_hand_computed() -> None:
    # intersection [5,10]x[5,10] = 25; union 100 + 100 - 25 = 175
    assert iou(Box(0, 0, 10, 10), Box(5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert iou(Box(0, 0, 10, 10), Box(0, 0, 10, 10)) == 1.0
    assert iou(Box(0, 0, 10, 10), Box(20, 20, 30, 30)) == 0.0
    # inside: 50 / 100
    assert iou(Box(0, 0, 10, 5), Box(0, 0, 10, 10)) == pytest.approx(0.5)


def test_disp_hand_computed() -> None:
    # W=20, H=40: (|0-5|/20 + |10-15|/20 + |0-5|/40 + |10-15|/40) / 4
    #           = (0.25 + 0.25 + 0.125 + 0.125) / 4 = 0.1875
    assert disp(Box(0, 0, 10, 10), Box(5, 5, 15, 15), 20, 40) == pytest.approx(0.1875)
    assert disp(Box(1, 2, 3, 4), Box(1, 2, 3, 4), 10, 10) == 0.0
    with pytest.raises(InputError):
        disp(Box(0, 0, 1, 1), Box(0, 0, 1, 1), 0, 10)


def test_best_gt_several_boxes() -> None:
    pred = Box(0, 0, 10, 10)
    gts = [
        Box(50, 50, 60, 60),  # IoU 0
        Box(0, 0, 10, 20),  # IoU 100 / 200 = 0.5
        Box(2, 0, 12, 10),  # inter 8*10 = 80, union 100 + 100 - 80 = 120 -> 2/3
    ]
    i, d = best_gt(pred, gts, 20, 40)
    assert i == pytest.approx(2 / 3)
    # Disp to that same box: (|0-2|/20 + |10-12|/20 + 0 + 0) / 4 = 0.2 / 4 = 0.05
    assert d == pytest.approx(0.05)
    # one box given bare
    assert best_gt(pred, Box(0, 0, 10, 20), 20, 40) == pytest.approx((0.5, (10 / 40) / 4))


def test_best_gt_tie_takes_first() -> None:
    pred = Box(0, 0, 10, 10)
    # both IoU 100/200 = 0.5; W=100, H=50
    first, second = Box(0, 0, 10, 20), Box(0, 0, 20, 10)
    # first: (0 + 0 + 0 + 10/50) / 4 = 0.05; second: (0 + 10/100 + 0 + 0) / 4 = 0.025
    assert best_gt(pred, [first, second], 100, 50) == pytest.approx((0.5, 0.05))
    assert best_gt(pred, [second, first], 100, 50) == pytest.approx((0.5, 0.025))
    with pytest.raises(InputError):
        best_gt(pred, [], 10, 10)


def test_alpha_recall() -> None:
    # 0.8, 0.75 (counts: >=), 0.9 pass; 0.7 fails -> 3/4
    assert alpha_recall([0.8, 0.75, 0.7, 0.9]) == 0.75
    assert alpha_recall([0.5, 0.6], alpha=0.5) == 1.0
    assert alpha_recall([]) == 0.0
    # an IoU of 0.75 computed in floats still counts: 75*100 / (100*100)
    assert alpha_recall([iou(Box(0, 0, 100, 75), Box(0, 0, 100, 100))]) == 1.0


def test_acc_k_n_hand_computed() -> None:
    mos = [5, 4, 3, 2, 1, 0]
    pred = [0.1, 0.9, 0.8, 0.2, 0.7, 0.3]
    # ranked by pred: idx1 (0.9, MOS 4), idx2 (0.8, MOS 3), idx4 (0.7, MOS 1), idx5 (0.3, MOS 0),
    #                 idx3 (0.2, MOS 2), idx0 (0.1, MOS 5)
    # N=5: 5th highest MOS = 1 -> top-4 MOS [4, 3, 1, 0] hits [y, y, y, n]
    assert [acc_k_n(pred, mos, k, 5) for k in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 0.75]
    # N=2: 2nd highest MOS = 4 -> hits [y, n, n, n] -> 1/1, 1/2, 1/3, 1/4
    assert [acc_k_n(pred, mos, k, 2) for k in (1, 2, 3, 4)] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    # N=10 > 6 candidates: threshold is the lowest MOS (0): every crop is a hit
    assert acc_k_n(pred, mos, 4, 10) == 1.0
    m = ranking_metrics(pred, mos)
    assert m["acc5"] == pytest.approx((1 + 1 + 1 + 0.75) / 4)  # 0.9375
    assert m["acc10"] == 1.0


def test_acc_k_n_ties() -> None:
    # MOS ties at the threshold count: 2nd highest MOS = 3; ranked: idx2 (MOS 3), idx1 (MOS 3), ...
    mos = [3, 3, 3, 2, 1, 1]
    pred = [0.5, 0.6, 0.7, 0.9, 0.1, 0.2]
    # order by pred: idx3 (MOS 2), idx2 (3), idx1 (3), idx0 (3); hits [n, y, y, y]
    assert [acc_k_n(pred, mos, k, 2) for k in (1, 2, 3, 4)] == pytest.approx([0, 1 / 2, 2 / 3, 3 / 4])
    # predicted-score ties keep the given order (stable sort)
    mos2 = [1, 5, 4, 3, 2, 0]
    flat = [1.0] * 6
    # order 0, 1, 2, ...; N=1 threshold 5: hits [n, y, n, n] -> 0, 1/2, 1/3, 1/4
    assert [acc_k_n(flat, mos2, k, 1) for k in (1, 2, 3, 4)] == pytest.approx([0, 1 / 2, 1 / 3, 1 / 4])
    # partial ties: idx1 and idx2 tie at 0.9 -> idx1 first (MOS 5), then idx2 (MOS 4)
    assert acc_k_n([0, 0.9, 0.9, 0, 0, 0], mos2, 1, 1) == 1.0
    assert acc_k_n([0, 0.9, 0.9, 0, 0, 0], mos2, 2, 1) == 0.5


def test_acc_k_n_errors() -> None:
    with pytest.raises(InputError):
        acc_k_n([1, 2], [1, 2, 3], 1, 5)
    with pytest.raises(InputError):
        acc_k_n([], [], 1, 5)
    with pytest.raises(InputError):
        acc_k_n([1], [1], 0, 5)
    with pytest.raises(InputError):
        acc_k_n([float("nan")], [1], 1, 5)


def test_correlations_hand_computed() -> None:
    x = [1, 2, 3, 4]
    y = [1, 3, 2, 10]
    # ranks of y: [1, 3, 2, 4]; d = [0, 1, 1, 0], sum d^2 = 2; rho = 1 - 6*2 / (4*(16-1)) = 0.8
    assert srcc(x, y) == pytest.approx(0.8)
    # dx = [-1.5, -0.5, 0.5, 1.5], dy = [-3, -1, -2, 6]; dx.dy = 4.5 + 0.5 - 1 + 9 = 13
    # |dx|^2 = 5, |dy|^2 = 50 -> 13 / sqrt(250)
    assert pcc(x, y) == pytest.approx(13 / math.sqrt(250))
    assert srcc(x, x[::-1]) == pytest.approx(-1.0)
    assert pcc(x, x[::-1]) == pytest.approx(-1.0)


def test_correlations_constant_input_is_zero_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert srcc([2, 2, 2, 2], [1, 2, 3, 4]) == 0.0
        assert srcc([1, 2, 3, 4], [5, 5, 5, 5]) == 0.0
        assert pcc([2, 2, 2], [1, 2, 3]) == 0.0
        assert srcc([1], [1]) == 0.0
        m = ranking_metrics([0.5] * 5, [1, 2, 3, 4, 5])
    assert m["srcc"] == 0.0 and m["pcc"] == 0.0
    # constant prediction = given order; MOS ascending, N=5 threshold = 1 (5 candidates) -> all hits
    assert m["acc5"] == 1.0


def test_ranking_metrics_keys() -> None:
    m = ranking_metrics([3, 2, 1], [3, 2, 1])
    assert tuple(m) == RANKING_KEYS
    assert all(0.0 <= m[k] <= 1.0 for k in RANKING_KEYS if k not in ("srcc", "pcc"))


def test_accumulator_means() -> None:
    acc = MetricAccumulator()
    empty = acc.summary()
    assert empty["n"] == 0 and math.isnan(empty["iou"]) and "n_ranked" not in empty
    # image 1: exact match -> IoU 1, Disp 0
    assert acc.add(Box(0, 0, 10, 10), [Box(0, 0, 10, 10)], 10, 10) == (1.0, 0.0)
    # image 2: IoU 25/175, Disp 0.1875 (see test_disp_hand_computed)
    acc.add(Box(0, 0, 10, 10), Box(5, 5, 15, 15), 20, 40)
    s = acc.summary()
    assert s["n"] == 2
    assert s["iou"] == pytest.approx((1 + 25 / 175) / 2)
    assert s["disp"] == pytest.approx(0.1875 / 2)
    assert s["alpha_recall"] == 0.5  # 1.0 passes, 0.143 fails
    assert "n_ranked" not in s
    acc.add_ranking([0.1, 0.9, 0.8, 0.2, 0.7, 0.3], [5, 4, 3, 2, 1, 0])  # acc5 0.9375 (above)
    acc.add_ranking([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])  # perfect: acc5 1, srcc 1
    s = acc.summary()
    assert s["n_ranked"] == 2
    assert s["acc5"] == pytest.approx((0.9375 + 1) / 2)
    assert s["acc4_5"] == pytest.approx((0.75 + 1) / 2)
    assert s["srcc"] == pytest.approx((srcc([0.1, 0.9, 0.8, 0.2, 0.7, 0.3], [5, 4, 3, 2, 1, 0]) + 1) / 2)
    assert set(RANKING_KEYS) <= set(s)


# --- the 3 real GAICD images ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gaicd_real():
    from needs import need_path

    need_path(GAICD / "image_crop.json", "GAICD's annotations (../shared/data/gaicd)")
    need_path(GAICD / "images", "GAICD's images (../shared/data/gaicd)")
    from cropper_engine.data.readers import read_dataset

    return read_dataset("gaicd", GAICD / "image_crop.json")


def test_gaicd_real_images(gaicd_real) -> None:
    from cropper_engine.imageio import image_size

    ds = gaicd_real
    assert sorted(e.id for e in ds) == ["211958.jpg", "265813.jpg", "297406.jpg"]
    assert ds.n_skipped == 1233  # every other record lacks its image
    assert not ds.notes  # no box needed clamping
    for ex in ds:
        assert (ex.width, ex.height) == image_size(ex.image_path)
        assert ex.scores is not None and len(ex.scores) == len(ex.crops) >= 80
        full = Box.full(ex.width, ex.height)
        assert all(full.contains(b) for b in ex.crops)


def test_gaicd_real_rankings(gaicd_real) -> None:
    acc = MetricAccumulator()
    for ex in gaicd_real:
        mos = ex.scores
        # ranking by the MOS itself is perfect
        m = ranking_metrics(mos, mos)
        assert m["acc5"] == m["acc10"] == 1.0
        assert m["srcc"] == pytest.approx(1.0) and m["pcc"] == pytest.approx(1.0)
        # the file lists crops best first: ranking by position is perfect too
        m = ranking_metrics([-i for i in range(len(mos))], mos)
        assert m["acc5"] == m["acc10"] == 1.0
        # reversed: the top-4 predicted are the 4 lowest MOS, far below the 10th highest
        # (e.g. 211958: lowest MOS 1.0, 10th highest 3.86) -> every Acc is 0; the ranks are
        # exactly reversed (average ranks for ties too) -> SRCC = PCC = -1
        assert sorted(mos)[3] < sorted(mos, reverse=True)[9]
        m = acc.add_ranking([-s for s in mos], mos)
        assert all(m[f"acc{k}_{n}"] == 0.0 for k in (1, 2, 3, 4) for n in (5, 10))
        assert m["srcc"] == pytest.approx(-1.0) and m["pcc"] == pytest.approx(-1.0)
        # a centred crop of half the size in each side overlaps some ground truth
        w, h = ex.width, ex.height
        centred = Box(w / 4, h / 4, 3 * w / 4, 3 * h / 4)
        i, d = acc.add(centred, ex.crops, w, h)
        assert 0.0 < i <= 1.0 and 0.0 <= d < 1.0
        # the best-MOS crop is its own best ground truth
        assert best_gt(ex.best_crop(), ex.crops, w, h) == (1.0, 0.0)
    s = acc.summary()
    assert s["n"] == s["n_ranked"] == 3
    assert s["acc5"] == 0.0 and s["srcc"] == pytest.approx(-1.0)
    assert 0.0 < s["iou"] <= 1.0
