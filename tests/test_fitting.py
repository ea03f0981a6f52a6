"""`cropper-engine fit` and `--default-model`: fitting the no-VLM default to a user's own crops.

The data are synthetic (made here, so CI needs no dataset): photos-like images whose "house
style" crop is a square around a bright disk. The fits are small (24 images, no mirror images,
one process, 3 folds): seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from needs import need_module
from PIL import Image

from cropper_engine.cli import main

need_module("lightgbm", "LightGBM (the fit extra)", module_level=True)


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def make_style_set(folder, n=24, seed=0):
    """n images 240x180: a smooth random background and a bright disk; the crop: a 110-px square
    centred on the disk, shifted inside the image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[0:180, 0:240]
    for i in range(n):
        base = rng.uniform(40, 140, 3)
        grad = (xx / 240.0)[..., None] * rng.uniform(-40, 40, 3)
        img = np.clip(base + grad + rng.normal(0, 6, (180, 240, 3)), 0, 255)
        cx, cy, r = rng.uniform(30, 210), rng.uniform(30, 150), rng.uniform(12, 22)
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[disk] = rng.uniform(200, 255, 3)
        name = f"s{i:02d}.jpg"
        Image.fromarray(img.astype(np.uint8)).save(folder / name, quality=92)
        x1 = int(round(min(max(cx - 55, 0), 240 - 110)))
        y1 = int(round(min(max(cy - 55, 0), 180 - 110)))
        rows.append({"image": name, "crops": [[x1, y1, x1 + 110, y1 + 110]]})
    ann = folder.parent / f"{folder.name}.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ann


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit through the command line, shared by the tests below."""
    import os

    base = tmp_path_factory.mktemp("fit")
    data_home = base / "xdg"
    old = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(data_home)
    try:
        ann = make_style_set(base / "style")
        res = run("fit", "--dataset", "jsonl", "--annotations", ann, "--images", base / "style", "--out",
                  base / "model", "--no-mirror", "--folds", "3", "--jobs", "1", "--json")
    finally:
        if old is None:
            os.environ.pop("XDG_DATA_HOME", None)
        else:
            os.environ["XDG_DATA_HOME"] = old
    return {"dir": base / "model", "report": json.loads(res.output.strip().splitlines()[-1]), "output": res.output,
            "ann": ann, "images": base / "style", "xdg": data_home}


def test_fit_writes_a_model_and_a_cross_validated_report(fitted):
    d = fitted["dir"]
    for f in ("model.json", "ratio.npz", "free.npz", "table/manifest.json", "table/vectors.f16.npy",
              "table/metadata.jsonl"):
        assert (d / f).is_file(), f
    meta = json.loads((d / "model.json").read_text())
    assert meta["kind"] == "fitted" and meta["trained_on"]["images"] == 24
    assert meta["trained_on"]["dataset"] == "jsonl" and "cropper-engine fit" in meta["command"]
    rep = fitted["report"]
    assert rep["images"] == 24
    for task in ("ratio", "free"):
        cv = rep["cv"][task]
        assert len(cv["per_fold"]) == cv["folds"] == 3 and sum(f["images"] for f in cv["per_fold"]) == 24
        for key in ("iou", "disp", "shipped_iou", "shipped_disp", "baseline_iou"):
            assert 0.0 <= cv[key] <= 1.0, (task, key, cv[key])
    # the house style (squares around the disk) is learnt: free-form, the fitted model's held-out
    # crops are much closer to it than the shipped model's (which never crops squares on its own)
    free = rep["cv"]["free"]
    assert free["iou"] > free["shipped_iou"] + 0.05, free
    assert "fitted IoU" in fitted["output"] and "--default-model" in fitted["output"]
    assert "fit: features" in fitted["output"]  # the progress bar (stderr, mixed in by CliRunner)


def test_crop_with_default_model_uses_it(fitted, tmp_path):
    img = fitted["images"] / "s03.jpg"
    res = run("crop", img, "--default-model", fitted["dir"], "--json")
    row = json.loads(next(line for line in res.output.splitlines() if line.startswith("{")))
    assert "the fitted model's table (24 examples" in res.output
    assert f"fitted model {fitted['dir'].resolve()}" in res.output
    assert row["pipeline"] == "no-vlm"
    shipped = json.loads(next(line for line in run("crop", img, "--json").output.splitlines()
                              if line.startswith("{")))
    # the fitted model crops squares (the style it learnt); the shipped one crops as FCDB does
    x1, y1, x2, y2 = row["box"]
    assert abs((x2 - x1) / (y2 - y1) - 1) < abs((shipped["box"][2] - shipped["box"][0])
                                                 / (shipped["box"][3] - shipped["box"][1]) - 1) + 0.05
    # the same through the config key, the environment and the library
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'default_model = "{fitted["dir"]}"\n')
    via_cfg = json.loads(next(line for line in run("--config", cfg, "crop", img, "--json").output.splitlines()
                              if line.startswith("{")))
    assert via_cfg["box"] == row["box"]
    from cropper_engine import Cropper

    assert list(Cropper(vlm="none", default_model=fitted["dir"]).crop(img, id="s03.jpg").box) == row["box"]


def test_eval_takes_default_model(fitted):
    res = run("eval", "--dataset", "jsonl", "--annotations", fitted["ann"], "--images", fitted["images"],
              "--method", "cropper", "--limit", "4", "--default-model", fitted["dir"], "--json")
    s = json.loads(res.output.strip().splitlines()[-1])
    assert s["n"] == 4 and 0 < s["iou"] <= 1


def test_models_list_shows_fitted_models(fitted, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(fitted["xdg"]))
    res = run("models", "list")
    assert str(fitted["dir"].resolve()) in res.output and "24 images" in res.output
    assert "*shipped" in res.output
    res = run("models", "list", "--fitted", "--json")
    got = json.loads(res.output)
    assert got["fitted"][0]["path"] == str(fitted["dir"].resolve()) and got["fitted"][0]["images"] == 24
    monkeypatch.setenv("CROPPER_DEFAULT_MODEL", str(fitted["dir"]))
    res = run("models", "list", "--fitted")
    assert f"*{fitted['dir'].resolve()}" in res.output and " shipped" in res.output


def test_too_few_examples_and_bad_model_dirs_are_refused(tmp_path):
    ann = make_style_set(tmp_path / "few", n=6)
    res = run("fit", "--dataset", "jsonl", "--annotations", ann, "--images", tmp_path / "few", "--out",
              tmp_path / "m", ok=False)
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "too few images to fit: 6 usable image(s) with a crop, at least 20 distinct images are needed" in res.output
    assert not (tmp_path / "m").exists()
    res = run("crop", tmp_path / "few" / "s00.jpg", "--default-model", tmp_path / "nowhere", ok=False)
    assert "--default-model" in res.output and "no such folder" in res.output and "cropper-engine fit" in res.output
    (tmp_path / "empty").mkdir()
    res = run("crop", tmp_path / "few" / "s00.jpg", "--default-model", tmp_path / "empty", ok=False)
    assert "not a fitted model (no model.json in it)" in res.output


def test_fit_refuses_to_overwrite(fitted):
    res = run("fit", "--dataset", "jsonl", "--annotations", fitted["ann"], "--out", fitted["dir"], ok=False)
    assert "already exists; pass --overwrite" in res.output


def test_results_of_a_crop_run_are_training_data(tmp_path):
    """--dataset results reads a crop run's results.jsonl: one example per image and ratio."""
    from cropper_engine.fitting import read_training

    make_style_set(tmp_path / "imgs", n=3)
    run("crop", tmp_path / "imgs", "--ratio", "1:1,16:9", "--out", tmp_path / "out")
    examples, skipped = read_training("results", str(tmp_path / "out" / "results.jsonl"))
    assert len(examples) == 6 and not skipped
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [list(e.crops[0].as_int()) for e in examples] == [r["box"] for r in rows]
    assert all(e.extra["pipeline"] == "no-vlm" for e in examples)
    (tmp_path / "imgs" / "s00.jpg").unlink()
    examples, skipped = read_training("results", str(tmp_path / "out" / "results.jsonl"))
    assert len(examples) == 4 and len(skipped) == 2 and "not found" in skipped[0]
    res = run("fit", "--dataset", "results", "--annotations", tmp_path / "out" / "results.jsonl", "--out",
              tmp_path / "m", ok=False)
    assert "crops by pipeline: no-vlm 4" in res.output
    assert "too few images to fit: 2 usable image(s) with a crop (4 examples: the crops or ratios of one image " \
           "count once)" in res.output


def test_serve_uses_the_default_model(fitted):
    need_module("fastapi", "the server extra (FastAPI)")
    from fastapi.testclient import TestClient

    from cropper_engine import Cropper
    from cropper_engine.config import load_config
    from cropper_engine.server import create_app

    img = fitted["images"] / "s05.jpg"
    cfg = load_config(env={}, overrides={"vlm.model": "none", "default_model": str(fitted["dir"])})
    with TestClient(create_app(cfg)) as client:
        r = client.post("/v1/crop", files={"image": ("s05.jpg", img.read_bytes(), "image/jpeg")},
                        data={"ratio": "1:1", "id": "s05.jpg"})  # the id: never retrieved as its own example
    assert r.status_code == 200, r.text
    want = Cropper(vlm="none", default_model=fitted["dir"]).crop(img, ratio="1:1", id="s05.jpg")
    assert r.json()["box"] == list(want.box)
    assert "serve" in run("serve", "--help").output and "--default-model" in run("serve", "--help").output


def test_fit_in_worker_processes_gives_the_same_model(fitted, tmp_path, monkeypatch):
    """--jobs 2 (spawned workers, each rebuilding the tables and the shipped model) fits the same
    model as one process, from inside this test runner, whose threads could deadlock a fork."""
    monkeypatch.setenv("XDG_DATA_HOME", str(fitted["xdg"]))
    res = run("fit", "--dataset", "jsonl", "--annotations", fitted["ann"], "--images", fitted["images"], "--out",
              tmp_path / "model2", "--no-mirror", "--folds", "3", "--jobs", "2", "--json")
    report = json.loads(res.output.strip().splitlines()[-1])
    one, two = fitted["report"], report
    assert one["cv"] and json.dumps(one["cv"], sort_keys=True) == json.dumps(two["cv"], sort_keys=True)
    a = sorted(p.name for p in fitted["dir"].rglob("*") if p.is_file())
    assert a == sorted(p.name for p in (tmp_path / "model2").rglob("*") if p.is_file())
    for name in ("ratio.npz", "free.npz"):
        x, y = np.load(fitted["dir"] / name), np.load(tmp_path / "model2" / name)
        assert x.files and all(np.array_equal(x[k], y[k]) for k in x.files)


# --- issue 23: distinct images, the minimum, interrupted fits, names that are not UTF-8 ---------------


def test_the_minimum_is_20_distinct_images(tmp_path):
    """19 images are refused before any work (a minimum lowered to 19 would start fitting them)."""
    ann = make_style_set(tmp_path / "s19", n=19)
    res = run("fit", "--dataset", "jsonl", "--annotations", ann, "--images", tmp_path / "s19", "--out",
              tmp_path / "m", "--no-mirror", "--folds", "3", "--jobs", "1", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "too few images to fit: 19 usable image(s) with a crop, at least 20 distinct images" in res.output
    assert "fit: table" not in res.output and not (tmp_path / "m").exists()


def test_results_rows_of_one_photo_are_one_image(tmp_path):
    """21 ratios of one photo in a results.jsonl are one image, not 21: refused with a named error
    (it passed the minimum, then LightGBM crashed with a traceback)."""
    make_style_set(tmp_path / "imgs", n=1)
    img = tmp_path / "imgs" / "s00.jpg"
    rows = [{"image": str(img), "box": [0, 0, 100 + i, 100], "width": 240, "height": 180, "task": "ratio",
             "ratio": f"{100 + i}:100", "pipeline": "vlm"} for i in range(21)]
    res_file = tmp_path / "results.jsonl"
    res_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run("fit", "--dataset", "results", "--annotations", res_file, "--out", tmp_path / "m", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "fitting on 21 examples of 1 images" in res.output
    assert "too few images to fit: 1 usable image(s) with a crop (21 examples: the crops or ratios of one image " \
           "count once), at least 20 distinct images are needed" in res.output


def test_a_killed_fit_leaves_nothing_behind(tmp_path):
    """SIGTERM: the fit cleans up its .NAME.fitting-PID folder itself; SIGKILL: the next fit of that
    folder removes it (a live process's is left alone)."""
    import signal
    import subprocess
    import sys
    import time

    ann = make_style_set(tmp_path / "style", n=24)
    out = tmp_path / "m"
    cmd = [sys.executable, "-c", "from cropper_engine.cli import main; main()", "fit", "--dataset", "jsonl",
           "--annotations", str(ann), "--images", str(tmp_path / "style"), "--out", str(out), "--folds", "3",
           "--jobs", "1"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        tmp = tmp_path / f".m.fitting-{proc.pid}"
        deadline = time.monotonic() + 120
        while not (tmp / "table").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0].decode()
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0].decode()
        assert not out.exists()
        if sig == signal.SIGTERM:
            assert proc.returncode == 130 and "interrupted" in output and "Traceback" not in output, output
            assert not tmp.exists()
        else:
            assert tmp.exists()
    live = tmp_path / ".m.fitting-1"  # pid 1 is alive: a fit still running, say
    live.mkdir()
    few = make_style_set(tmp_path / "few", n=6)
    res = run("fit", "--dataset", "jsonl", "--annotations", few, "--images", tmp_path / "few", "--out", out, ok=False)
    assert "too few images" in res.output and f"removed {tmp}" in res.output
    assert not tmp.exists() and live.exists()


def test_model_folder_named_in_another_encoding(fitted, tmp_path, monkeypatch):
    """A model folder whose name is not UTF-8: the CV table is printed, `models list` shows it (the
    byte as \\udcXX, as the JSON writes it) and crop uses it."""
    import os

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/mod\xe9l")
    res = run("fit", "--dataset", "jsonl", "--annotations", fitted["ann"], "--images", fitted["images"], "--out",
              out, "--no-mirror", "--folds", "3", "--jobs", "1")
    assert "fitted IoU" in res.output and "mod\\udce9l (24 images" in res.output
    assert "mod\\udce9l  (jsonl, 24 images" in run("models", "list", "--fitted").output
    assert json.loads(run("models", "list", "--fitted", "--json").output)["fitted"][0]["path"] == out
    assert "no-vlm" in run("crop", fitted["images"] / "s01.jpg", "--default-model", out).output
