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
        # the shipped max_new_tokens (the longest box in the tokenizer's tokens + the end token)
        assert r["max_new_tokens"] == len(" (99.99, 1000, 1000, 1000, 1000)") + 1
        assert r["longest_prompt_tokens"] + r["max_new_tokens"] <= r["context_length"] == 8192
        assert not any("cut at the token limit" in n for n in r["notes"]) and r["memory_need_gb"] > 0


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
