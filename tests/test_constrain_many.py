"""The vectorised constraint pass (`Cropper._constrain_many`, `geometry.fit_ratio_array`,
`faces.untouched`) gives exactly what `Cropper._constrain` gives one box at a time."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cropper_engine.engine.geometry import fit_ratio, fit_ratio_array
from cropper_engine.engine.loop import Cropper, Job
from cropper_engine.engine.subject.detectors import Face, _grow_face
from cropper_engine.engine.subject.faces import faces_to_keep
from cropper_engine.imageio import LoadedImage
from cropper_engine.types import Box, Ratio, Task

W, H = 1024, 683


def _boxes(n: int, seed: int) -> np.ndarray:
    """Unit boxes as the default's candidates are, plus the awkward ones: reversed corners,
    outside the image, tiny, the whole image."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.0, 1.0, (n, 2))
    s = rng.uniform(0.02, 1.1, (n, 2))
    b = np.concatenate([c - s / 2, c + s / 2], axis=1)
    b[: n // 10] = b[: n // 10][:, [2, 3, 0, 1]]  # corners swapped
    b[n // 10: n // 5] *= 0.01  # tiny, at the top left
    b[-1] = [0.0, 0.0, 1.0, 1.0]
    # a third of them with an edge through a face (the faces' centres below): they must be repaired
    centres = np.array([[460, 190], [735, 240], [50, 480]]) / np.array([W, H])
    k = rng.integers(0, len(centres), n // 3)
    b[n // 5: n // 5 + n // 3:2, 0] = centres[k[::2], 0]
    b[n // 5 + 1: n // 5 + n // 3:2, 3] = centres[k[1::2], 1]
    return b


def _cropper() -> SimpleNamespace:
    fake = SimpleNamespace(cfg=SimpleNamespace(loop=SimpleNamespace(min_side=0.2)))
    fake._constrain = functools.partial(Cropper._constrain, fake)
    return fake


def _job(ratio: Ratio | None, subject: Box | None, faces: list[Face]) -> Job:
    img = LoadedImage(Image.new("RGB", (W, H)), "<test>")
    job = Job(0, img, Task.RATIO if ratio else Task.FREE, ratio, None, subject)
    r = ratio.value if ratio else None
    job.faces = list(faces_to_keep(faces, r, W, H)) if faces else []
    return job


def _face(x1: float, y1: float, x2: float, y2: float, score: float) -> Face:
    b = Box(x1, y1, x2, y2)
    return Face(b, score, _grow_face(b, W, H))


# a main face, a second main face (over half its side) and a small one at the edge (a passer-by)
FACES = [_face(400, 120, 520, 260, 0.9), _face(700, 200, 770, 280, 0.8), _face(20, 450, 80, 510, 0.7)]


@pytest.mark.parametrize("ratio", [None, Ratio(1, 1), Ratio(16, 9), Ratio(9, 16), Ratio(4, 5)])
@pytest.mark.parametrize("subject,faces", [(None, []), (Box(300, 300, 600, 500), []), (None, FACES),
                                           (Box(380, 100, 540, 600), FACES[:1])])
def test_many_equals_one_by_one(ratio, subject, faces):
    fake = _cropper()
    job = _job(ratio, subject, faces)
    u = _boxes(400, seed=7)
    many = Cropper._constrain_many(fake, job, u)
    one = [Cropper._constrain(fake, job, Box.from_unit(row, W, H)) for row in u]
    assert many == one  # exact, not approximate: the ranked features must not move
    assert sum(b is not None for b in many) > 100
    if faces:  # the boxes through a face were repaired (not returned as they came)
        moved = sum(b is not None and b != Cropper._constrain(fake, _job(ratio, subject, []), Box.from_unit(row, W, H))
                    for b, row in zip(many, u, strict=True))
        assert moved > 20


def test_fit_ratio_array_is_fit_ratio_bit_for_bit():
    rng = np.random.default_rng(3)
    for ratio in (1.0, 16 / 9, 9 / 16, 1.5, 0.8):
        px = _boxes(500, seed=int(ratio * 100)) * np.array([W, H, W, H])
        px = np.concatenate([np.minimum(px[:, :2], px[:, 2:]), np.maximum(px[:, :2], px[:, 2:])], axis=1)
        px = np.clip(px + rng.normal(0, 3, px.shape), 0, [W, H, W, H])
        got = fit_ratio_array(px, ratio, W, H)
        want = np.array([fit_ratio(Box(*row), ratio, W, H).as_list() for row in px])
        assert np.array_equal(got, want)


@pytest.mark.parametrize("inner", [Box(400, 120, 520, 260), Box(0, 0, 300, 683), Box(900, 500, 1024, 683),
                                   Box(100, 50, 1000, 120)])  # the last: no 9:16 crop holds it
def test_expand_to_contain_array_is_expand_to_contain_bit_for_bit(inner):
    from cropper_engine.engine.geometry import expand_to_contain, expand_to_contain_array

    px = _boxes(300, seed=11) * np.array([W, H, W, H])
    px = np.clip(np.concatenate([np.minimum(px[:, :2], px[:, 2:]), np.maximum(px[:, :2], px[:, 2:])], axis=1),
                 0, [W, H, W, H])
    for ratio in (None, 1.0, 16 / 9, 9 / 16, 0.8):
        got = expand_to_contain_array(px, inner, W, H, ratio)
        want = np.array([expand_to_contain(Box(*row), inner, W, H, ratio).as_list() for row in px])
        assert np.array_equal(got, want), ratio
