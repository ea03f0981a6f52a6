"""The benchmark scripts run end to end at toy sizes (their figures are not checked here, only
that they run and report what they promise: a bench that breaks silently reports nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from needs import need_module, need_path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fullsize_cpu_check(tmp_path):
    """The GPU script's CPU mode at a small size (make gpu-rehearsal runs it at the real S, T, R,
    L): every mode and batch size reports stage times, tokens and the fraction of the device's
    limit, every row by the VLM, sampling never fell back; the last line printed is the JSON's path."""
    out = tmp_path / "fullsize.json"
    proc = subprocess.run([sys.executable, "bench/fullsize.py", "--shape", "tiny", "--device", "cpu", "--batches",
                           "1,2", "-S", "4", "--repeats", "1", "--examples", "12", "--json", str(out), "--strict"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    fig = json.loads(out.read_text())
    assert [(r["mode"], r["batch"]) for r in fig["results"]] == [("list", 1), ("list", 2), ("parallel", 1),
                                                                ("parallel", 2)]
    assert fig["problems"] == {} and fig["skipped"] == []
    for r in fig["results"]:
        assert r["pipelines"] == {"vlm": r["batch"]}
        assert r["generated_tokens_per_image"] > 0 and r["images_per_s"] > 0
        assert set(r["stage_s_per_image"]) == {"vision", "prefill", "decode"}
        assert all(v > 0 for v in r["fraction_of_limit"].values())
        # the shipped max_new_tokens: the longest answer (R=6 boxes in one, the default list mode)
        # in the tokenizer's tokens + the end token
        boxes = 6 if r["mode"] == "list" else 1
        assert r["max_new_tokens"] == len(" " + ", ".join(["(4.99, 1000, 1000, 1000, 1000)"] * boxes)) + 1
        assert r["sampling"] == "grouped" and r["sampling_note"] is None
        assert r["longest_prompt_tokens"] + r["max_new_tokens"] <= r["context_length"] == 8192
        assert not any("cut at the token limit" in n for n in r["notes"]) and r["memory_need_gb"] > 0


@pytest.mark.slow
def test_loop_bench_figures_are_consistent(tmp_path):
    """The loop bench's figures agree with each other (ratios with their parts, stage times with
    their total, the hit rate with its token counts); how fast is for the benchmark to say."""
    fig = run_bench("bench/loop_bench.py", "--backend", "transformers", "--batch", "2", "--images", "2", "-S", "2",
                    "-R", "2", "-L", "1", "--repeats", "1", "--warmup", "1", "--index-size", "20",
                    "--json-out", str(tmp_path / "loop.json"))
    assert fig == json.loads((tmp_path / "loop.json").read_text())
    assert fig["pipelines"] == {"vlm": fig["images"] * fig["repeats"]}
    assert fig["warmup_runs"] >= 1
    approx = lambda x: pytest.approx(x, rel=2e-3, abs=2e-4)  # noqa: E731 - the figures are rounded
    assert fig["speedup"] == approx(fig["engine_images_per_s"] / fig["naive_images_per_s"])
    assert fig["tokens_ratio"] == approx(fig["engine_tokens_per_image"] / fig["naive_tokens_per_image"])
    es, ns = fig["engine_stage_s_per_image"], fig["naive_stage_s_per_image"]
    stages = ("decode", "embed", "retrieve", "saliency", "prompt", "generate", "score")
    assert set(fig["stage_speedup"]) == set(stages) <= set(es) & set(ns)
    for k in stages:
        # stage_speedup is rounded to 3 decimals: off by up to 5e-4 however small the ratio
        assert fig["stage_speedup"][k] == pytest.approx(ns[k] / es[k], rel=2e-3, abs=5.01e-4), k
    assert es["total"] == approx(sum(es[k] for k in stages))
    assert es["vlm_vision"] + es["vlm_prefill"] + es["vlm_decode"] <= es["generate"] * 1.001
    assert fig["engine_p50_s"] <= fig["engine_p95_s"] and fig["naive_p50_s"] <= fig["naive_p95_s"]
    # the hit rate: tokens served from the prefix store over tokens shared with an earlier prompt,
    # both counted apart (the shared count from the token ids, not from the store)
    assert 0 <= fig["refine_cached_tokens"] <= fig["refine_cacheable_tokens"] <= fig["refine_prompt_tokens"]
    assert fig["refine_cacheable_tokens"] > 0
    assert fig["prefix_cache_hit_rate"] == approx(fig["refine_cached_tokens"] / fig["refine_cacheable_tokens"])
    assert fig["prefix_cache_hit_rate_source"] == "all refinement rounds"
    for k in ("vision", "prefill", "decode"):
        lim = fig["limits"][k]
        assert lim["measured_s"] == es[f"vlm_{k}"]
        assert lim["fraction_of_limit"] == approx(lim["limit_s"] / lim["measured_s"])

    # distinct candidates per round, for the run's mode (the default list) and both modes in the probe
    assert fig["mode"] == "list" and [d["round"] for d in fig["distinct_per_round"]] == [0, 1]
    assert all(0 <= d["distinct"] <= d["boxes"] <= 2 for d in fig["distinct_per_round"])
    for mode in ("list", "parallel"):
        probe = fig["mode_probe"][mode]
        assert probe["images_per_s"] > 0 and [d["round"] for d in probe["distinct_per_round"]] == [0, 1]

@pytest.mark.vllm
@pytest.mark.slow
def test_loop_bench_on_vllm_runs_the_naive_loop_on_vllm_interleaved(tmp_path):
    """The vLLM figure is like for like: the naive loop runs on the engine's own LLM (one request
    per image per round), the two take turns on the same images (the order alternating per
    repeat), and vLLM's caches are emptied before each phase."""
    from needs import need_module

    need_module("vllm", "vLLM (the .venv-vllm environment, make install-vllm)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    fig = run_bench("bench/loop_bench.py", "--backend", "vllm", "--block-size", "32", "--batch", "2", "--images", "2",
                    "-S", "2", "-R", "2", "-L", "1", "--repeats", "2", "--warmup", "1", "--index-size", "20",
                    "--no-mode-probe", "--json-out", str(tmp_path / "loop-vllm.json"))
    assert fig["backend"] == fig["naive_backend"] == "vllm" and "NaiveVLLMLoop" in fig["naive_loop"]
    assert fig["timed_order"] == ["engine then naive", "naive then engine"]
    assert {"prefix (KV)", "multimodal-input", "encoder-output"} <= set(fig["caches_reset"])
    assert "prefix caching is on for both" in fig["cache_note"]
    assert len(fig["engine_run_s"]) == len(fig["naive_run_s"]) == fig["repeats"] == 2
    assert fig["pipelines"] == {"vlm": fig["images"] * fig["repeats"]} and fig["engine_vlm_errors"] == 0
    approx = lambda x: pytest.approx(x, rel=2e-3, abs=2e-4)  # noqa: E731 - the figures are rounded
    assert fig["speedup"] == approx(fig["engine_images_per_s"] / fig["naive_images_per_s"])
    es, ns = fig["engine_stage_s_per_image"], fig["naive_stage_s_per_image"]
    stages = ("decode", "embed", "retrieve", "saliency", "prompt", "generate", "score")
    assert set(fig["stage_speedup"]) == set(stages) <= set(es) & set(ns)
    # the same answers asked for: R boxes in one list answer per round from both loops
    assert fig["naive_tokens_per_image"] > 0
    assert fig["tokens_ratio"] == pytest.approx(1.0, rel=0.5)
    assert fig["engine_p50_s"] <= fig["engine_p95_s"] and fig["naive_p50_s"] <= fig["naive_p95_s"]


def test_loop_bench_refuses_to_time_without_a_warm_up():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "bench/loop_bench.py", "--warmup", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--warmup must be at least 1" in out.stderr


def test_result_files_carry_their_provenance(tmp_path):
    """Every result file records the command, the commit (and whether the code differed from it),
    the machine's load at the start and end and whether it was busy."""
    from bench.common import save_json

    path = save_json(tmp_path / "x.json", {"figure": 1.5}, command="python -m bench x")
    f = json.loads(path.read_text())
    p = f["provenance"]
    assert f["figure"] == 1.5 and p["command"] == "python -m bench x"
    assert len(p["git"]["commit"]) == 40 and p["git"]["dirty"] in (True, False)
    m = p["machine"]
    assert len(m["load_avg_start"]) == len(m["load_avg_end"]) == 3 and m["cores"] >= 1
    assert m["busy"] == (m["load_avg_start"][0] > 0.5 * m["cores"])


def test_readme_figures_come_from_the_result_files():
    """Every figure block of README.md and docs/*.md is what `python -m bench readme` generates
    from the committed files in bench/results/ (refresh: python -m bench readme --write); every
    block is on some page, once."""
    from bench import readme

    names = []
    for page in readme.pages():
        text = page.read_text()
        names += [name for _, name, _, _ in readme.BLOCK.findall(text)]
        _, changed = readme.render(text)
        assert not changed, f"{page.name}: figure blocks out of date: {changed}; run python -m bench readme --write"
    assert sorted(names) == sorted(readme.BLOCKS)  # every block present, once each


def test_bench_all_lists_every_result_file_the_readme_reads():
    """`python -m bench all` writes every file the README's blocks read."""
    import re

    from bench import all as bench_all
    from bench import readme

    written = {f for s in bench_all.STEPS for f in s.writes} | {"bench_all.json"}
    read = set(re.findall(r'load\("([a-z_0-9-]+\.json)"\)', (ROOT / "bench" / "readme.py").read_text()))
    assert read and read <= written, read - written
    assert readme.BLOCKS


FCDB = ROOT.parent / "shared" / "data" / "fcdb"


@pytest.mark.slow
def test_default_bench_runs_smartcrop_beside_the_default(tmp_path):
    """Both crop the same images (interleaved); the ratio of the medians and both IoUs are reported."""
    need_module("smartcrop", "smartcrop.py (the bench extra)")
    fig = run_bench("bench/default_bench.py", "--n", "2", "--tasks", "ratio", "--out", str(tmp_path / "d.json"))
    t = fig["tasks"]["ratio"]
    assert t["images"] == 2 and t["peer"]["name"] == "smartcrop.py" and t["peer"]["wall_ms_median"] > 0
    assert t["median_ratio_to_peer"] == pytest.approx(t["wall_ms_median"] / t["peer"]["wall_ms_median"], rel=0.02)
    need_path(FCDB / "val.jsonl", "FCDB (../shared/data/fcdb)")
    assert 0 < t["iou"] <= 1 and 0 < t["peer"]["iou"] <= 1
    assert "smartcrop.py" in (tmp_path / "d.md").read_text()


@pytest.mark.slow
def test_default_bench_camera_times_24_mp_jpegs_beside_smartcrop_and_a_full_decode(tmp_path):
    """--camera: FCDB val images enlarged to 6000 px (written under --work, not the repository),
    the default beside smartcrop.py and beside itself with a full decode; the boxes' shift."""
    pytest.importorskip("smartcrop")
    if not (FCDB / "val.jsonl").exists():
        pytest.skip("FCDB data not present")
    work = tmp_path / "work"
    fig = run_bench("bench/default_bench.py", "--camera", "--n", "3", "--tasks", "ratio", "--work", str(work),
                    "--out", str(tmp_path / "c.json"))
    assert fig["camera"]["megapixels_median"] > 20 and fig["camera"]["turned_by_exif"] == 1
    assert sorted(p.name for p in work.iterdir()) == ["camera0000.jpg", "camera0001.jpg", "camera0002.jpg"]
    t = fig["tasks"]["ratio"]
    assert t["images"] == 3 and t["peer"]["cpu_ms_mean"] > 0 and 0 < t["iou"] <= 1
    fd = t["full_decode"]
    assert fd["wall_ms_median"] > 0 and 0 <= fd["within_1px"] <= 1 and fd["box_shift_max"] >= fd["box_shift_median"]
    assert fig["threads"]["smartcrop.py"] == "one thread"
    md = (tmp_path / "c.md").read_text()
    assert "full decode (as before)" in md and "camera size" in md


@pytest.mark.slow
def test_face_bench_reports_the_share_keeping_every_main_face(tmp_path):
    need_module("mediapipe", "the subject extra (MediaPipe)")
    need_path(FCDB / "val.jsonl", "FCDB (../shared/data/fcdb)")
    fig = run_bench("bench/face_bench.py", "--limit", "1", "--splits", "val", "--out", str(tmp_path / "f.json"))
    assert fig["images"] == 1 and set(fig["modes"]) == {"whole", "size", "main"}
    assert fig["ranking_ms"]["images"] == 1 and fig["ranking_ms"]["mean"] >= 0
    main = fig["modes"]["main"]
    for name in ("1:1", "4:5", "16:9", "9:16", "gt", "free"):
        assert main[name]["crops"] == 1
        if main[name]["ratio_allows"]:
            assert main[name]["keeps_every_main_face"] == 1.0  # the rule shipped: always, where the ratio allows
    assert 0 < main["gt"]["iou_val"] <= 1 and 0 < main["free"]["iou_val"] <= 1
    assert json.loads((tmp_path / "f.json").read_text())["per_image"]["main"][0]["faces"]


def test_bench_help_exits_0_and_unknown_name_exits_2():
    for args in ((), ("--help",), ("-h",)):
        p = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, (args, p.stderr)
        assert "python -m bench loop" in p.stdout
    p = subprocess.run([sys.executable, "-m", "bench", "nosuch"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "unknown benchmark 'nosuch'" in p.stderr
