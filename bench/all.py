"""Every figure the README quotes, regenerated: `python -m bench all` (or `make bench-all`).

    python -m bench all [--quick] [--only a,b] [--skip a,b] [--vllm-python PATH] [--list]

Runs each step below as its own process (so each result file records the load when it started),
one after another, goes on past a step that fails, then rewrites the README's figure blocks from
the result files (`python -m bench readme --write`) and exits 1 if any step failed. A summary with
each step's time and exit status goes to bench/results/bench_all.json. About 90 minutes on a quiet
2-core machine (the sum of the steps' `minutes` below, a quarter of it the style experiments, a
third the ranker study).
`--quick` runs every step at smoke size (about 32 minutes on a busy machine): it proves the
mechanism, into bench/results/quick/ (not committed) unless `--results DIR` says otherwise, and
leaves the README alone unless that DIR is bench/results.

The vLLM steps run in .venv-vllm (`--vllm-python`, $CROPPER_VLLM_PYTHON); without it they fail
(the README quotes them), so pass `--skip loop-vllm,serve-openai` on a machine without vLLM.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save_json  # noqa: E402


@dataclass
class Step:
    name: str
    args: list[str]  # after `python -m bench`
    quick: list[str]  # the smoke-size arguments instead
    writes: list[str]  # result files, relative to bench/results
    minutes: float  # on a quiet 2-core machine (full size)
    vllm: bool = False  # runs in .venv-vllm
    env: dict[str, str] = field(default_factory=dict)


VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
STEPS = [
    Step("eval", ["eval"], ["eval", "--limit", "20"], ["fcdb_val_eval.json"], 0.6),
    Step("default", ["default", "--out"], ["default", "--quick", "--out"], ["default_bench.json", "default_bench.md"],
         0.5),
    Step("default-camera", ["default", "--camera", "--out"], ["default", "--camera", "--quick", "--out"],
         ["default_bench_camera.json", "default_bench_camera.md"], 1.5),
    Step("subject", ["subject"], ["subject", "--quick"], ["subject_bench.json"], 0.3),
    Step("index", ["index", "--quick", "--embedders", "none", "--out"],
         ["index", "--sizes", "2000", "--embedders", "none", "--out"], ["index_bench.json"], 3.0),
    Step("index-embedders", ["index", "--sizes", "1000", "--embedders", "classical,tiny_open_clip,vit_b32_random",
                             "--out", "{results}/index_bench_embedders.json"],
         ["index", "--sizes", "1000", "--embedders", "classical,tiny_open_clip", "--out",
          "{results}/index_bench_embedders.json"], ["index_bench_embedders.json"], 1.0),
    Step("loop", ["loop", "--backend", "transformers", "--out"],
         ["loop", "--backend", "transformers", "--quick", "--out"], ["loop.json", "loop.md", "loop.png"], 1.5),
    Step("loop-vllm", ["loop", "--backend", "vllm", "--block-size", "32", "--out"],
         ["loop", "--backend", "vllm", "--block-size", "32", "--quick", "--out"],
         ["loop-vllm.json", "loop-vllm.md", "loop-vllm.png"], 4.0, vllm=True, env=VLLM_ENV),
    Step("serve", ["serve", "--quick", "--out", "{results}/serve_bench_transformers.json"],
         ["serve", "--duration", "6", "--clients", "1,4", "--out", "{results}/serve_bench_transformers.json"],
         ["serve_bench_transformers.json"], 2.5),
    Step("serve-openai", ["serve", "--backend", "openai", "--quick", "--out", "{results}/serve_bench_openai.json"],
         ["serve", "--backend", "openai", "--duration", "6", "--clients", "1,4", "--out",
          "{results}/serve_bench_openai.json"], ["serve_bench_openai.json"], 3.5),
    Step("server-tests", ["server-tests"], ["server-tests", "--seconds", "20"], ["server_load_tests.json"], 3.5),
    Step("cost", ["cost", "--out"], ["cost", "--out"], ["costmodel.json"], 0.1),
    Step("cv", ["cv"], ["cv", "--limit", "60", "--folds", "2"], ["default_cv.json"], 6.0),
    Step("ranker-study", ["ranker-study"], ["ranker-study", "--limit", "60", "--tasks", "ratio"],
         ["ranker_study.json", "ranker_study.md"], 30.0),
    Step("faces", ["faces", "--out", "{results}/face_bench.json"],
         ["faces", "--quick", "--out", "{results}/face_bench.json"], ["face_bench.json", "face_bench.md"], 5.0),
    Step("persons", ["persons"], ["persons", "--limit", "60"], ["person_study.json"], 1.5),
    Step("memory", ["memory"], ["memory", "--clients", "4", "--megapixels", "40"], ["serve_memory.json"], 2.0),
    Step("style-square", ["style", "--style", "square", "--sizes", "25,50,100", "--test", "100", "--val-models",
                          "0,100"],
         ["style", "--style", "square", "--quick"], ["style_experiment_square.json", "style_experiment_square.md"],
         8.0),
    Step("style-tight45", ["style", "--style", "tight45", "--sizes", "100", "--test", "100", "--val-models", "0,100"],
         ["style", "--style", "tight45", "--quick"], ["style_experiment_tight45.json", "style_experiment_tight45.md"],
         6.0),
    Step("style-tight45-300", ["style", "--style", "tight45", "--sizes", "100,300", "--test", "100", "--val-models",
                               "0,300", "--out", "{results}/style_experiment_tight45_300.json"],
         ["style", "--style", "tight45", "--quick", "--out", "{results}/style_experiment_tight45_300.json"],
         ["style_experiment_tight45_300.json", "style_experiment_tight45_300.md"], 12.0),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench all", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every step at smoke size (proves the mechanism)")
    ap.add_argument("--only", default="", help="comma-separated steps to run")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--vllm-python", default=os.environ.get("CROPPER_VLLM_PYTHON") or
                    str(ROOT / ".venv-vllm" / "bin" / "python"), help="the interpreter of .venv-vllm")
    ap.add_argument("--results", default=None, help="where the result files go [default: bench/results; "
                    "with --quick bench/results/quick]")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    a = ap.parse_args(argv)
    names = [s.name for s in STEPS]
    only = [x for x in a.only.split(",") if x]
    skip = [x for x in a.skip.split(",") if x]
    for x in only + skip:
        if x not in names:
            ap.error(f"unknown step {x!r}; the steps: {', '.join(names)}")
    steps = [s for s in STEPS if (not only or s.name in only) and s.name not in skip]
    if a.list:
        for s in STEPS:
            print(f"{s.name:16s} ~{s.minutes:4.1f} min  python -m bench {' '.join(s.args)}"
                  f"{'  (.venv-vllm)' if s.vllm else ''}  -> {', '.join(s.writes)}")
        print(f"total ~{sum(s.minutes for s in STEPS):.0f} min on a quiet 2-core machine")
        return 0
    results = Path(a.results or (ROOT / "bench" / "results" / ("quick" if a.quick else ""))).resolve()
    results.mkdir(parents=True, exist_ok=True)
    committed = results == (ROOT / "bench" / "results").resolve()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "CROPPER_BENCH_RESULTS": str(results), "PYTHONPATH": path, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CROPPER_VLLM_PYTHON": a.vllm_python,
           "CROPPER_BENCH_SMOKE": "1" if a.quick else ""}
    summary = []
    t_all = time.time()
    for k, s in enumerate(steps):
        py = a.vllm_python if s.vllm else sys.executable
        shown = results.relative_to(ROOT.resolve()) if results.is_relative_to(ROOT.resolve()) else results
        args = [x.replace("{results}", str(shown)) for x in (s.quick if a.quick else s.args)]
        cmd = [py, "-m", "bench", *args]
        print(f"\n=== [{k + 1}/{len(steps)}] {s.name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.time()
        if s.vllm and not Path(py).exists():
            rc, note = 127, f"{py} not found (make install-vllm, or --vllm-python PATH)"
        else:
            try:
                rc, note = subprocess.run(cmd, cwd=ROOT, env={**env, **s.env}).returncode, ""
            except OSError as e:
                rc, note = 126, str(e)
        dt = time.time() - t0
        missing = [f for f in s.writes if not (results / f).exists() or (results / f).stat().st_mtime < t0]
        ok = rc == 0 and not missing
        summary.append({"step": s.name, "command": "python -m bench " + " ".join(s.quick if a.quick else s.args)
                        .replace("{results}", "bench/results"),
                        "exit_status": rc, "seconds": round(dt, 1), "ok": ok, "writes": s.writes,
                        "not_written": missing, "note": note})
        print(f"=== {s.name}: {'ok' if ok else 'FAILED'} in {dt / 60:.1f} min"
              f"{f' (exit {rc})' if rc else ''}{f'; not written: {missing}' if missing else ''}"
              f"{f'; {note}' if note else ''}", file=sys.stderr, flush=True)
    failed = [x["step"] for x in summary if not x["ok"]]
    if len(steps) == len(STEPS):  # the summary the README quotes is of a whole run
        save_json(results / "bench_all.json", {"quick": a.quick, "steps": summary, "failed": failed,
                                                "minutes": round((time.time() - t_all) / 60, 1)})
    # the README's figure blocks from the result files (a failed step leaves its old file, and its figures)
    rc_readme = 0
    if committed:
        rc_readme = subprocess.run([sys.executable, "-m", "bench", "readme", "--write"], cwd=ROOT, env=env).returncode
    else:
        print(f"results in {results}; README.md left alone (its figures come from bench/results)", file=sys.stderr)
    print(f"\n{len(summary) - len(failed)} of {len(summary)} steps ok in {(time.time() - t_all) / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + (f"; summary in {results / 'bench_all.json'}" if len(steps) == len(STEPS) else ""),
          file=sys.stderr)
    return 1 if failed or rc_readme else 0


if __name__ == "__main__":
    sys.exit(main())
