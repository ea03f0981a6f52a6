"""The command line as users drive it: crop, eval, index, models; bad input gets clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cropper_engine.cli import main


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_help_imports_nothing_heavy():
    """`--help` loads click and the package, no third-party library besides (what it imports
    decides its start-up time, and unlike a wall-clock bound this holds on a busy machine)."""
    out = subprocess.run([sys.executable, "-c", "import sys, json; from cropper_engine.cli import main; "
                          "main(['--help'], standalone_mode=False); "
                          "print('MODULES', json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"],
                         capture_output=True, text=True, check=True)
    mods = json.loads(out.stdout.split("MODULES", 1)[1])
    third_party = {m for m in mods if m not in sys.stdlib_module_names and not m.startswith("_")}
    assert third_party == {"click", "cropper_engine"}, third_party
    assert "crop" in out.stdout and "index" in out.stdout and "eval" in out.stdout


def test_crop_default_pipeline_writes_everything(photos, tmp_path):
    out = tmp_path / "out"
    res = run("crop", *photos[:2], "--ratio", "1:1,16:9", "--out", out, "--size", "200x200", "--report")
    assert "no-vlm" in res.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["ratio"] for r in rows} == {"1:1", "16:9"}
    for r in rows:
        assert r["pipeline"] == "no-vlm" and r["task"] == "ratio"
        assert set(r) >= {"image", "box", "score", "task", "ratio", "pipeline", "candidates", "timings"}
        img = Image.open(r["output"])
        assert max(img.size) <= 200  # --size fits, never upscales
        assert abs(img.width / img.height - (1 if r["ratio"] == "1:1" else 16 / 9)) < 0.03
    assert len({r["output"] for r in rows}) == 4
    html = (out / "report" / "index.html").read_text()
    assert html.count('class="card"') == 4 and "<svg" in html


def test_crop_json_stdout_and_resume(photos, tmp_path):
    out = tmp_path / "o"
    res = run("crop", photos[0], "--json", "--out", out)
    line = next(ln for ln in res.output.splitlines() if ln.startswith("{"))
    assert json.loads(line)["pipeline"] == "no-vlm"
    again = run("crop", photos[0], "--out", out, ok=False)
    assert again.exit_code != 0 and "--resume" in again.output
    res = run("crop", photos[0], photos[1], "--out", out, "--resume")
    assert "1 skipped" in res.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_crop_bad_files_do_not_stop_the_others(photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(photos[0]).read_bytes()[:300])  # truncated
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    res = run("crop", photos[1], broken, text, tmp_path / "missing.jpg", "--out", tmp_path / "o", ok=False)
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert "broken.jpg" in res.output and "notes.png" in res.output and "missing.jpg" in res.output
    rows = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1 and Path(photos[1]).name in rows[0]


@pytest.mark.parametrize("args,msg", [
    (["--ratio", "0:5"], "positive"),
    (["--ratio", "abc"], "W:H"),
    (["--task", "ratio"], "--ratio"),
    (["--task", "subject"], "--mask"),
    (["--size", "big"], "WxH"),
    (["--report"], "--out"),
    (["--size", "100x100"], "--size needs --out DIR"),  # it was ignored without an output folder
    (["--out", ""], "--out '' names no folder"),  # it was taken as no --out at all
])
def test_crop_refuses_bad_options_before_work(photos, args, msg):
    res = run("crop", photos[0], *args, ok=False)
    assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output


def test_crop_subject_mask_checked_before_work(photos, tmp_path):
    w, h = Image.open(photos[0]).size
    small = tmp_path / "small.png"
    Image.new("L", (10, 10), 255).save(small)
    res = run("crop", photos[0], "--mask", small, ok=False)
    assert "10x10" in res.output and f"{w}x{h}" in res.output
    empty = tmp_path / "empty.png"
    Image.new("L", (w, h), 0).save(empty)
    assert "empty" in run("crop", photos[0], "--mask", empty, ok=False).output
    good = tmp_path / "good.png"
    m = np.zeros((h, w), np.uint8)
    m[h // 4: h // 2, w // 4: w // 2] = 255
    Image.fromarray(m).save(good)
    res = run("crop", photos[0], "--mask", good, "--json")
    row = json.loads(next(ln for ln in res.output.splitlines() if ln.startswith("{")))
    x1, y1, x2, y2 = row["box"]
    assert row["task"] == "subject" and x1 <= w // 4 and y1 <= h // 4 and x2 >= w // 2 and y2 >= h // 2


def test_crop_subject_mask_checked_before_work_for_folders_and_manifests(photos, tmp_path):
    """A directory or manifest input: the mask is checked against its first image, up front."""
    w, h = Image.open(photos[0]).size
    src = tmp_path / "shoot"
    src.mkdir()
    Image.open(photos[0]).save(src / "a.jpg")
    (tmp_path / "list.txt").write_text("shoot/a.jpg\n")
    small = tmp_path / "small.png"
    Image.new("L", (10, 10), 255).save(small)
    for source in (src, tmp_path / "list.txt"):
        res = run("crop", source, "--mask", small, "--out", tmp_path / "o", ok=False)
        assert res.exit_code != 0 and "Traceback" not in res.output
        assert "10x10" in res.output and f"{w}x{h}" in res.output and "a subject mask" in res.output
        assert not (tmp_path / "o").exists()  # refused before any work


def test_crop_never_overwrites_inputs_or_collides(tmp_path, photos):
    a = tmp_path / "in" / "a"
    b = tmp_path / "in" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    Image.open(photos[0]).save(a / "x.jpg")
    Image.open(photos[1]).save(b / "x.jpg")
    run("crop", a / "x.jpg", b / "x.jpg", "--out", tmp_path / "in")
    outs = [json.loads(x)["output"] for x in (tmp_path / "in" / "results.jsonl").read_text().splitlines()]
    assert len(set(outs)) == 2
    assert Image.open(a / "x.jpg").size == Image.open(photos[0]).size


def test_resume_never_reuses_an_earlier_runs_output(tmp_path, photos):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    Image.open(photos[0]).save(a / "x.jpg")
    Image.open(photos[1]).save(b / "x.jpg")
    out = tmp_path / "out"
    run("crop", a / "x.jpg", "--out", out)
    first = (out / "crops" / "x.jpg").read_bytes()
    res = run("crop", a / "x.jpg", b / "x.jpg", "--out", out, "--resume")
    assert "1 skipped" in res.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len({r["output"] for r in rows}) == 2
    assert (out / "crops" / "x.jpg").read_bytes() == first  # a's crop is still a's
    assert all(Path(r["output"]).exists() for r in rows)


def test_output_folder_equal_to_the_input_folder_is_not_cropped_again(photos, tmp_path):
    src = tmp_path / "shoot"
    src.mkdir()
    for p in photos[:2]:
        Image.open(p).save(src / Path(p).name)
    run("crop", src, "--out", src, "--report")
    (src / "more.jpg").write_bytes(Path(photos[2]).read_bytes())
    res = run("crop", src, "--out", src, "--report", "--resume")
    assert "2 skipped" in res.output
    rows = [json.loads(x) for x in (src / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == sorted([*(Path(p).name for p in photos[:2]), "more.jpg"])
    assert not (src / "crops" / "crops").exists() and not (src / "crops" / "report").exists()


def test_resumed_report_keeps_the_earlier_cards(photos, tmp_path):
    """--resume --report: the report shows every image of both runs, each with its own thumbnails."""
    out = tmp_path / "out"
    run("crop", photos[0], photos[1], "--out", out, "--report")
    thumbs = {p.name: p.read_bytes() for p in (out / "report" / "thumbs").iterdir()}
    run("crop", photos[0], photos[1], photos[2], "--out", out, "--report", "--resume")
    html = (out / "report" / "index.html").read_text()
    assert html.count('class="card"') == 3
    for p in photos[:3]:
        assert Path(p).name in html
    assert all((out / "report" / "thumbs" / n).read_bytes() == b for n, b in thumbs.items())  # not overwritten
    assert len(list((out / "report" / "thumbs").iterdir())) == 6


def test_crop_with_tiny_vlm(photos, tiny_dir, tmp_path):
    res = run("crop", photos[0], "--vlm", tiny_dir / "idefics2", "--backend", "transformers",
              "-R", "2", "-L", "1", "--json")
    row = json.loads(next(ln for ln in res.output.splitlines() if ln.startswith("{")))
    assert row["pipeline"] == "vlm"
    assert "zero-shot" in res.output


def test_missing_vlm_explains_how_to_get_it(photos):
    res = run("crop", photos[0], "--vlm", "mantis-8b-idefics2", ok=False)
    assert "huggingface-cli download TIGER-Lab/Mantis-8B-Idefics2" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("path", ["/nonexistent/path", "./no/model", "~/no-model", "a/b/c"])
def test_missing_vlm_folder_is_named_as_a_folder(photos, path):
    res = run("crop", photos[0], "--vlm", path, ok=False)
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert f"no such model folder: {path}" in res.output and "huggingface-cli" not in res.output
    assert "hub id" in res.output


def test_models_list_and_make_tiny(tmp_path):
    res = run("models", "list")
    assert "mantis-8b-idefics2" in res.output and "qwen2.5-vl-7b" in res.output
    rows = json.loads(run("models", "list", "--json").output)
    assert any(r["default"] for r in rows) and not any(r["local"] for r in rows)
    res = run("models", "make-tiny", tmp_path / "tiny")
    assert (tmp_path / "tiny" / "idefics2" / "config.json").exists()
    assert (tmp_path / "tiny" / "clip" / "open_clip" / "open_clip_config.json").exists()
    # an existing model is never replaced silently; --overwrite replaces it whole
    stale = tmp_path / "tiny" / "idefics2" / "stale.bin"
    stale.write_bytes(b"x")
    res = run("models", "make-tiny", tmp_path / "tiny", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    tiny = tmp_path / "tiny"
    assert f"{tiny / 'idefics2'}, {tiny / 'clip'} already exist; pass --overwrite" in res.output
    assert stale.exists()
    run("models", "make-tiny", tmp_path / "tiny", "--overwrite")
    assert (tmp_path / "tiny" / "idefics2" / "config.json").exists() and not stale.exists()


def test_index_commands_round_trip(photos, tmp_path, tiny_dir):
    ann = tmp_path / "ann.jsonl"
    with ann.open("w") as fh:
        for p in photos:
            w, h = Image.open(p).size
            fh.write(json.dumps({"image": str(p), "crops": [[0, 0, w // 2, h // 2]], "scores": [4.0]}) + "\n")
    emb = f"open_clip-dir:{tiny_dir / 'clip' / 'open_clip'}"
    idx = tmp_path / "idx"
    run("index", "build", "--dataset", "jsonl", "--annotations", ann, "--out", idx, "--embedder", emb)
    res = run("index", "build", "--dataset", "jsonl", "--annotations", ann, "--out", idx, ok=False)
    assert "--overwrite" in res.output
    info = json.loads(run("index", "info", idx, "--json").output)
    assert info["count"] == len(photos) and info["embedder"]["spec"] == emb
    hits = json.loads(run("index", "query", idx, photos[0], "-k", "2", "--json").output)
    assert hits[0]["id"] in (str(photos[0]), photos[0].name) and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    res = run("index", "query", idx, photos[0], "--embedder", "classical", ok=False)
    assert "classical" in res.output and "open_clip-dir" in res.output
    # crop with this index: retrieval transfers neighbours' crops
    out = run("crop", photos[1], "--index", idx, "--json").output
    row = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
    assert any(c["source"].startswith("neighbour") for c in row["candidates"])


def test_eval_center_on_fcdb_equals_a_hand_computed_baseline(fcdb):
    """The largest centred crop of the ground truth's ratio, computed here from val.jsonl alone
    (box, IoU and Disp by hand, none of the package's geometry or metrics), is what `eval` reports."""
    records = [json.loads(line) for line in (fcdb / "val.jsonl").read_text().splitlines() if line.strip()]
    ious, disps = [], []
    for r in records:
        big_w, big_h = r["width"], r["height"]
        gx1, gy1, gx2, gy2 = r["crop"]
        ratio = (gx2 - gx1) / (gy2 - gy1)
        w, h = (big_h * ratio, big_h) if big_w / big_h > ratio else (big_w, big_w / ratio)
        x1, y1, x2, y2 = (big_w - w) / 2, (big_h - h) / 2, (big_w + w) / 2, (big_h + h) / 2
        inter = max(0.0, min(x2, gx2) - max(x1, gx1)) * max(0.0, min(y2, gy2) - max(y1, gy1))
        ious.append(inter / (w * h + (gx2 - gx1) * (gy2 - gy1) - inter))
        disps.append(((abs(x1 - gx1) + abs(x2 - gx2)) / big_w + (abs(y1 - gy1) + abs(y2 - gy2)) / big_h) / 4)
    res = run("eval", "--dataset", "fcdb", "--annotations", fcdb / "val.jsonl", "--method", "center",
              "--ratio-from-gt", "--json")
    s = json.loads(res.output.strip().splitlines()[-1])
    assert s["n"] == len(records) == 200 and s["errors"] == 0
    assert s["iou"] == pytest.approx(np.mean(ious), abs=2e-3)
    assert s["disp"] == pytest.approx(np.mean(disps), abs=1e-3)
    assert s["alpha_recall"] == pytest.approx(np.mean(np.asarray(ious) >= 0.75), abs=0.011)


def test_eval_bad_inputs(photos, tmp_path):
    res = run("eval", "--dataset", "fcdb", "--annotations", "/nonexistent.jsonl", ok=False)
    assert "nonexistent" in res.output and "Traceback" not in res.output
    ann = tmp_path / "ann.jsonl"
    w, h = Image.open(photos[0]).size
    ann.write_text(json.dumps({"image": str(photos[0]), "crops": [[0, 0, w // 2, h // 2]]}) + "\n")
    assert "IoU" in run("eval", "--dataset", "jsonl", "--annotations", ann).output  # a valid set
    for ann_file in (ann, "/nonexistent.jsonl"):  # the method is refused before the set is read
        res = run("eval", "--dataset", "jsonl", "--annotations", ann_file, "--method", "magic", ok=False)
        assert res.exit_code != 0 and "Traceback" not in res.output
        assert "unknown method 'magic'" in res.output and "center, cropper, full" in res.output


def test_output_folder_inside_the_input_folder_is_not_cropped_again(photos, tmp_path):
    src = tmp_path / "shoot"
    src.mkdir()
    for p in photos[:2]:
        Image.open(p).save(src / Path(p).name)
    run("crop", src, "--out", src / "out")
    rows = [json.loads(x) for x in (src / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == sorted(Path(p).name for p in photos[:2])


def test_many_skipped_records_are_grouped():
    from cropper_engine.cli import summarise_skipped

    msgs = [f"{i}.jpg: image file /data/{i}.jpg not found; skipped" for i in range(50)]
    msgs.append("x.jpg: crop [1, 2, 1, 9] is degenerate (x2 <= x1); skipped")
    out = summarise_skipped(msgs)
    assert out[:5] == msgs[:5]
    assert "50 x image file … not found; skipped" in out
    assert any(line.startswith("1 x crop") for line in out)
    assert summarise_skipped(msgs[:3]) == msgs[:3]


def test_a_broken_file_does_not_stop_the_subject_precheck(photos, tmp_path):
    """Checking --subject against the named images before work skips an unreadable one: the good
    images are still cropped, the broken one is named in its turn."""
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    res = run("crop", bad, photos[1], "--subject", "100,100", ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "bad.jpg: not an image" in res.output and f"{Path(photos[1]).name}\tsubject" in res.output


def test_index_add_of_the_same_images_says_they_are_there(photos, tmp_path):
    """Adding the examples an index holds already: "already in the index", not "unreadable images"."""
    ann = tmp_path / "ann.jsonl"
    with ann.open("w") as fh:
        for p in photos:
            w, h = Image.open(p).size
            fh.write(json.dumps({"image": str(p), "crops": [[0, 0, w // 2, h // 2]]}) + "\n")
    idx = tmp_path / "idx"
    run("index", "build", "--dataset", "jsonl", "--annotations", ann, "--out", idx, "--embedder", "classical")
    res = run("index", "add", idx, "--dataset", "jsonl", "--annotations", ann)
    n = len(photos)
    assert f"added 0 examples to {idx} ({n} skipped ({n} already in the index))" in res.output
    assert "unreadable" not in res.output
