"""Fused scoring equals an independent per-crop reference and does not depend on the batch;
aesthetic heads load; classical scoring without CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cropper_engine.engine.features import FEATURE_NAMES, SaliencyTable, box_features
from cropper_engine.errors import ConfigError, ModelNotFoundError
from cropper_engine.models.scorers import (
    CANVAS_FACTOR,
    AestheticHead,
    FusedScorer,
    cut_and_resize,
)
from cropper_engine.types import Box


@pytest.fixture(scope="module")
def clip(tiny_dir):
    from cropper_engine.models.embedders import load_embedder

    return load_embedder(f"open_clip-dir:{tiny_dir / 'clip' / 'open_clip'}", device="cpu")


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((320, 240), (200, 300))]


def _boxes(img, k):
    w, h = img.size
    return [Box(0.05 * w * i, 0.04 * h * i, w - 0.03 * w * i, h - 0.05 * h * i) for i in range(k)]


def test_cut_and_resize_equals_per_crop_reference():
    """One grid_sample over side-by-side canvases == cutting each crop from its canvas alone."""
    torch.manual_seed(0)
    canv = torch.rand(3, 3, 32, 32)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.7, 0.9], [0.5, 0.5, 0.75, 1.0], [0.0, 0.3, 0.4, 0.6]])
    index = torch.tensor([0, 1, 2, 1])
    fused = cut_and_resize(canv, boxes, index, 16)
    for m in range(len(boxes)):
        # the reference: the crop cut from its own canvas alone, the same bilinear sampling
        t = (torch.arange(16) + 0.5) / 16
        x1, y1, x2, y2 = boxes[m]
        gx = (x1 + (x2 - x1) * t) * 2 - 1
        gy = (y1 + (y2 - y1) * t) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
        ref = torch.nn.functional.grid_sample(canv[index[m]][None], grid, mode="bilinear", padding_mode="border",
                                              align_corners=False)
        assert torch.allclose(fused[m], ref[0], atol=1e-6)
    # the full box reproduces the canvas resized
    full = torch.nn.functional.interpolate(canv[:1], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(fused[0], full[0], atol=1e-5)


def test_fused_scores_equal_an_independent_per_crop_reference(clip, photos):
    """Each crop cut from its own image (integer pixels) and resized alone with torch, embedded
    alone, compared with its image embedded alone: the fused pass (canvases side by side, one
    grid_sample, one embedder call) gives the same CLIP scores, and each fused crop embedding is
    nearest to its own crop's reference (a crop scored against another crop or image would not be).
    Area and composition by hand from the box and the image's saliency."""
    import torch.nn.functional as F

    from cropper_engine.models.saliency import spectral_residual_saliency
    from cropper_engine.models.scorers import ClassicalScorer

    imgs = [Image.open(p).convert("RGB") for p in photos[:2]]
    boxes = [[*_boxes(imgs[0], 5), Box(0, 0, 0.3 * imgs[0].width, 0.3 * imgs[0].height)], _boxes(imgs[1], 3)]
    scorer = FusedScorer(clip)
    prep = scorer.prepare(imgs, boxes)
    raw = scorer.forward(prep)
    out = scorer.finish(prep, raw)
    fused_emb = raw["emb"].numpy()
    side = clip.input_size

    def embed_region(img, box):
        """The box's centre square (its shorter side), as CLIP's preprocessing keeps of an image."""
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        sq = min(box.width, box.height)
        cx, cy = box.center
        x1, y1, x2, y2 = (round(v) for v in (cx - sq / 2, cy - sq / 2, cx + sq / 2, cy + sq / 2))
        pixels = F.interpolate(t[:, :, y1:y2, x1:x2], size=(side, side), mode="bilinear", antialias=True,
                               align_corners=False)
        with torch.inference_mode():
            return clip.encode_pixels(pixels)[0].numpy()

    refs, row = [], 0
    for i, img in enumerate(imgs):
        w, h = img.size
        full = embed_region(img, Box.full(w, h))
        small = np.asarray(img.convert("L").resize((160, round(160 * h / w)) if w >= h else (round(160 * w / h), 160)),
                           dtype=np.float32)
        table = SaliencyTable.from_map(spectral_residual_saliency(small, 64))
        row += 1  # the image's own row in the fused batch
        for j, b in enumerate(boxes[i]):
            ref = embed_region(img, b)
            refs.append((row, ref))
            row += 1
            c = out.components[i]
            assert c["clip"][j] == pytest.approx(float(np.clip(ref @ full, 0, 1)), abs=2e-3), (i, j)
            assert c["area"][j] == pytest.approx(b.width * b.height / (w * h), rel=1e-9)
            unit = np.array([[b.x1 / w, b.y1 / h, b.x2 / w, b.y2 / h]])
            assert c["classical"][j] == pytest.approx(
                float(ClassicalScorer().score(box_features(table, unit, w / h))[0]), abs=1e-9)
            # free-form by default: aesthetics (here the composition stand-in) + area, the paper's Table 2 row
            want = np.mean([c["area"][j], c["classical"][j]])
            assert out.total[i][j] == pytest.approx(want, abs=1e-9)
    ref_mat = np.stack([r for _, r in refs])
    for row, _ in refs:  # every fused crop embedding is nearest to its own reference
        sims = ref_mat @ fused_emb[row]
        assert [r for r, _ in refs][int(np.argmax(sims))] == row


def test_a_crop_scores_the_same_alone_and_in_a_batch(clip):
    imgs = _images()
    boxes = [_boxes(imgs[0], 5), _boxes(imgs[1], 3)]
    scorer = FusedScorer(clip)
    fused = scorer.score(imgs, boxes)
    for i, img in enumerate(imgs):  # each crop alone, through the same resize op
        for j, b in enumerate(boxes[i]):
            alone = scorer.score([img], [[b]])
            for name, vals in fused.components[i].items():
                assert vals[j] == pytest.approx(alone.components[0][name][0], abs=1e-5), name
    # no aesthetic head: the classical composition score stands in for it, with its weight
    assert set(fused.components[0]) == {"area", "classical", "clip"}
    assert scorer.weights_for("free") == {"area": 1.0, "classical": 1.0}
    assert scorer.weights_for("ratio") == {"area": 1.0, "clip": 1.0, "classical": 1.0}
    # CLIP similarity of the full box with the full image is 1
    full = scorer.score([imgs[0]], [[Box.full(*imgs[0].size)]])
    assert full.components[0]["clip"][0] == pytest.approx(1.0, abs=1e-5)
    assert CANVAS_FACTOR * clip.input_size >= clip.input_size


def test_aesthetic_heads_both_formats(tmp_path, clip):
    torch.manual_seed(0)
    lin = torch.nn.Linear(clip.dim, 1)
    torch.save(lin.state_dict(), tmp_path / "linear.pth")
    mlp = torch.nn.Sequential(torch.nn.Linear(clip.dim, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 16),
                              torch.nn.Linear(16, 1))
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "mlp.safetensors"))
    x = torch.nn.functional.normalize(torch.randn(4, clip.dim), dim=-1)
    head = AestheticHead(tmp_path / "linear.pth")
    assert torch.allclose(head(x), lin(x).squeeze(-1), atol=1e-6)
    head = AestheticHead(tmp_path / "mlp.safetensors")
    mlp.eval()
    assert torch.allclose(head(x), mlp(x).squeeze(-1), atol=1e-6)
    assert AestheticHead.to_unit(np.array([1.0, 10.0, 5.5])).tolist() == [0.0, 1.0, 0.5]
    with pytest.raises(ModelNotFoundError, match="LAION"):
        AestheticHead(tmp_path / "missing.pth")
    scorer = FusedScorer(clip, head)
    out = scorer.score(_images()[:1], [_boxes(_images()[0], 3)])
    # every part present: the paper's scorer, no classical term
    assert "aesthetic" in out.components[0] and scorer.components == ["aesthetic", "area", "clip"]
    assert "classical" not in out.components[0]


def test_without_clip_the_classical_term_stands_in_for_clip_and_aesthetics():
    from cropper_engine.models.classical import ClassicalEmbedder

    scorer = FusedScorer(ClassicalEmbedder())  # no encode_pixels: never used for crops
    assert scorer.components == ["area", "classical"]
    assert scorer.weights_for("ratio") == {"area": 1.0, "classical": 2.0}
    assert scorer.weights_for("free") == {"area": 1.0, "classical": 1.0}  # free-form has no CLIP term
    out = scorer.score(_images()[:1] * 2, [_boxes(_images()[0], 4)] * 2, tasks=["ratio", "free"])
    assert all(0 <= v <= 1 for v in out.total[0])
    c = out.components[0]
    np.testing.assert_allclose(out.total[0], (c["area"] + 2 * c["classical"]) / 3)
    np.testing.assert_allclose(out.total[1], (c["area"] + c["classical"]) / 2)
    # the stand-in is named wherever its score is shown
    assert "classical: the composition stand-in, for no aesthetic head and no CLIP weights here" in scorer.describe()
    assert scorer.prompt_words("ratio") == "a composition estimate (standing in for aesthetics and content kept) " \
        "and area"
    assert scorer.prompt_words("free") == "a composition estimate (standing in for aesthetics) and area"


def test_weights_per_task_are_config_data(clip, tmp_path):
    from cropper_engine.config import load_config
    from cropper_engine.engine.build import _scorer

    f = tmp_path / "c.toml"
    f.write_text("[scoring.ratio]\narea = 3.0\nclip = 0.5\n[scoring.subject]\naesthetic = 0\n")
    cfg = load_config(f, env={"CROPPER_SCORING_FREE_CLIP": "2"})
    assert (cfg.scoring.ratio.area, cfg.scoring.ratio.clip, cfg.scoring.free.clip) == (3.0, 0.5, 2.0)
    scorer = _scorer(cfg, clip, {})
    # no aesthetic head here: classical (composition) takes the aesthetic weight (none in the subject task)
    assert scorer.weights_for("ratio") == {"area": 3.0, "clip": 0.5, "classical": 1.0}
    assert scorer.weights_for("subject") == {"area": 1.0, "clip": 1.0}
    assert scorer.weights_for("free") == {"area": 1.0, "clip": 2.0, "classical": 1.0}
    imgs = _images()[:2]
    boxes = [_boxes(im, 3) for im in imgs]
    out = scorer.score(imgs, boxes, tasks=["ratio", "subject"])
    for i, task in enumerate(("ratio", "subject")):
        w = scorer.weights_for(task)
        want = sum(v * out.components[i][k] for k, v in w.items()) / sum(w.values())
        np.testing.assert_allclose(out.total[i], want, rtol=1e-6)
    bad = tmp_path / "bad.toml"
    bad.write_text("[scoring.free]\naesthetic = 0\nclip = 0\narea = 0\n")
    with pytest.raises(ConfigError, match="scoring.free"):
        load_config(bad, env={})


def test_saliency_features_by_hand():
    sal = np.zeros((10, 10))
    sal[2:4, 6:8] = 1.0  # all saliency in x 0.6..0.8, y 0.2..0.4
    t = SaliencyTable.from_map(sal)
    f = box_features(t, np.array([[0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0]]), 1.0)
    col = {n: f[:, i] for i, n in enumerate(FEATURE_NAMES)}
    assert col["area"].tolist() == pytest.approx([0.25, 0.25])
    assert col["mass"].tolist() == pytest.approx([1.0, 0.0], abs=1e-9)
    assert col["density"][0] == pytest.approx(4.0)
    # saliency centroid (0.7, 0.3) vs crop centre (0.75, 0.25), in crop widths: -0.1, +0.1
    assert col["com_dx"][0] == pytest.approx(-0.1) and col["com_dy"][0] == pytest.approx(0.1)
    assert col["outside_peak"][1] == pytest.approx(1.0)


def test_per_image_work_is_reused_and_never_stale(clip):
    """Each round scores new boxes on the same images: the image's canvas and saliency table
    are made once; a different image (even at a recycled id) is never served another's."""
    import gc

    scorer = FusedScorer(clip)
    imgs = _images()
    first = scorer.score(imgs, [_boxes(im, 3) for im in imgs])
    again = scorer.score(imgs, [_boxes(im, 3) for im in imgs])
    assert all(np.array_equal(a, b) for a, b in zip(first.total, again.total, strict=True))
    assert len(scorer._images) == 2
    for _ in range(5):  # fresh images, the old ones freed: ids may recur, contents differ
        rng = np.random.default_rng(len(scorer._images))
        other = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        got = scorer.score([other], [_boxes(other, 3)]).total[0]
        ref = FusedScorer(clip).score([other], [_boxes(other, 3)]).total[0]
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
        del other
        gc.collect()
