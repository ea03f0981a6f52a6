"""The benchmark scripts run end to end at toy sizes (their figures are not checked here, only
that they run and report what they promise: a bench that breaks silently reports nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fullsize_cpu_check():
    """The GPU script's CPU mode (the documented check before a GPU run): every batch size
    reports stage times, tokens and the fraction of the device's limit, every row by the VLM."""
    fig = run_bench("bench/fullsize.py", "--shape", "tiny", "--device", "cpu", "--batches", "1,2", "-S", "4",
                    "--repeats", "1", "--examples", "12")
    assert [r["batch"] for r in fig["results"]] == [1, 2]
    for r in fig["results"]:
        assert r["pipelines"] == {"vlm": r["batch"]}
        assert r["generated_tokens_per_image"] > 0 and r["images_per_s"] > 0
        assert set(r["stage_s_per_image"]) == {"vision", "prefill", "decode"}
        assert all(v > 0 for v in r["fraction_of_limit"].values())


@pytest.mark.slow
def test_loop_bench_reports_speedup_and_cache(tmp_path):
    fig = run_bench("bench/loop_bench.py", "--backend", "transformers", "--batch", "2", "--images", "2", "-S", "2",
                    "-R", "2", "-L", "1", "--repeats", "1", "--warmup", "1", "--index-size", "20",
                    "--json-out", str(tmp_path / "loop.json"))
    assert fig == json.loads((tmp_path / "loop.json").read_text())
    assert fig["speedup"] > 0 and fig["engine_images_per_s"] > 0 and fig["naive_images_per_s"] > 0
    assert fig["pipelines"] == {"vlm": 2}
    assert fig["tokens_ratio"] > 0 and fig["engine_tokens_per_image"] > 0
    assert fig["prefix_cache_hit_rate"] == 1.0 and fig["prefix_cache_hit_rate_source"] == "all refinement rounds"
    assert {"vision", "prefill", "decode"} <= set(fig["limits"])


FCDB = ROOT.parent / "shared" / "data" / "fcdb"


@pytest.mark.slow
def test_default_bench_runs_smartcrop_beside_the_default(tmp_path):
    """Both crop the same images (interleaved); the ratio of the medians and both IoUs are reported."""
    pytest.importorskip("smartcrop")
    fig = run_bench("bench/default_bench.py", "--n", "2", "--tasks", "ratio", "--out", str(tmp_path / "d.json"))
    t = fig["tasks"]["ratio"]
    assert t["images"] == 2 and t["peer"]["name"] == "smartcrop.py" and t["peer"]["wall_ms_median"] > 0
    assert t["median_ratio_to_peer"] == pytest.approx(t["wall_ms_median"] / t["peer"]["wall_ms_median"], rel=0.02)
    if (FCDB / "val.jsonl").exists():
        assert 0 < t["iou"] <= 1 and 0 < t["peer"]["iou"] <= 1
    assert "smartcrop.py" in (tmp_path / "d.md").read_text()


@pytest.mark.slow
def test_face_bench_reports_the_share_keeping_every_main_face(tmp_path):
    pytest.importorskip("mediapipe")
    if not (FCDB / "val.jsonl").exists():
        pytest.skip("FCDB data not present")
    fig = run_bench("bench/face_bench.py", "--limit", "1", "--splits", "val", "--out", str(tmp_path / "f.json"))
    assert fig["images"] == 1 and set(fig["modes"]) == {"whole", "main"}
    main = fig["modes"]["main"]
    for name in ("1:1", "4:5", "16:9", "9:16", "gt", "free"):
        assert main[name]["crops"] == 1
        if main[name]["ratio_allows"]:
            assert main[name]["keeps_every_main_face"] == 1.0  # the rule shipped: always, where the ratio allows
    assert 0 < main["gt"]["iou_val"] <= 1 and 0 < main["free"]["iou_val"] <= 1
    assert json.loads((tmp_path / "f.json").read_text())["per_image"]["main"][0]["faces"]
