"""Scale-out on a small local Ray cluster with the tiny model: every image once, resumable."""

from __future__ import annotations

import json

import pytest
from needs import need_module

ray = need_module("ray", "Ray Data (the scale extra)", module_level=True)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_ray_crops_every_image_once_and_resumes(local_ray, photos, tiny_dir, tmp_path):
    from cropper_engine.scaleout import done_images, run

    manifest = tmp_path / "images.txt"
    manifest.write_text("\n".join([*map(str, photos), str(tmp_path / "missing.jpg")]) + "\n")
    out = tmp_path / "out"
    over = {"vlm.model": str(tiny_dir / "idefics2"), "vlm.backend": "transformers", "vlm.candidates": 2,
            "vlm.rounds": 1}
    counts = run(str(manifest), str(out), actors=2, batch_size=2, overrides=over, task="ratio", ratios="1:1")
    assert counts["rows"] == len(photos) and counts["errors"] == 1
    rows = [json.loads(line) for f in (out / "results").glob("*.jsonl") for line in f.read_text().splitlines()]
    good = [r for r in rows if not r.get("error")]
    assert sorted(r["source"] for r in good) == sorted(map(str, photos))  # each once, none mixed up
    assert all(r["pipeline"] == "vlm" and r["ratio"] == "1:1" for r in good)
    from PIL import Image

    assert len(list((out / "crops").rglob("*.jpg"))) == len(photos)
    for r in good:  # each row's own file: a whole JPEG of its box (1:1), not an empty or torn file
        x1, y1, x2, y2 = r["box"]
        with Image.open(r["output"]) as im:
            im.load()
            assert im.size == (x2 - x1, y2 - y1) and im.width == im.height > 0, (r["output"], im.size, r["box"])
    assert "no such file" in next(r for r in rows if r.get("error"))["error"]
    # a rerun does only what is missing: the broken path, which fails again
    again = run(str(manifest), str(out), actors=1, batch_size=2, overrides=over, task="ratio", ratios="1:1")
    assert again["already_done"] == len(photos) and again["rows"] == 0 and again["errors"] == 1
    assert done_images(out) == set(map(str, photos))
