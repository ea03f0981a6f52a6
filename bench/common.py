"""What every benchmark report carries: provenance, the device and its limits, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# where result files go: bench/results (committed, what the README quotes), or $CROPPER_BENCH_RESULTS
# (`python -m bench all --quick` writes its smoke-size figures elsewhere)
RESULTS = Path(os.environ.get("CROPPER_BENCH_RESULTS") or ROOT / "bench" / "results")
# the machine's load when this process started (before the benchmark's own work): a figure taken
# with other work running is marked so in its result file
LOAD_AT_START = os.getloadavg()
STARTED = time.time()


def git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran on, and whether the tracked code differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "cropper_engine", "bench",
                    ":(exclude)bench/results")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        # a copy of the tree without .git (the lent GPU machine): the commit the caller names
        return {"commit": os.environ.get("CROPPER_BENCH_COMMIT", "unknown"), "dirty": None}


GIT_AT_START = git_state()


def machine_load() -> dict[str, Any]:
    """Load averages (1, 5, 15 min) when the process started and now, against the cores; `busy`
    when other work kept more than half the cores busy at the start."""
    cores = os.cpu_count() or 1
    busy = LOAD_AT_START[0] > 0.5 * cores
    return {"cores": cores, "load_avg_start": [round(x, 2) for x in LOAD_AT_START],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()], "busy": busy,
            "note": "busy machine: other work was running, figures are indicative" if busy
            else "quiet machine"}


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].startswith("python -m "):  # `python -m bench NAME` (bench/__main__.py names it so)
        return " ".join(argv)
    return " ".join(["python", *argv])


def provenance(command: str | None = None) -> dict[str, Any]:
    """What every result file carries: the command, the commit the process started on (and whether
    the code differed from it then), the machine and its load, versions."""
    return {"command": command or _command(), "git": GIT_AT_START,
            # `python -m bench all --quick` marks its smoke-size runs, whatever sizes each bench calls quick
            "smoke": bool(os.environ.get("CROPPER_BENCH_SMOKE")),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - STARTED, 1), "machine": {**device_info(), **machine_load()},
            "versions": versions()}


def save_json(path: str | Path, figures: dict[str, Any], command: str | None = None) -> Path:
    """Write the figures with their provenance (under "provenance") to PATH; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**figures, "provenance": provenance(command)}, indent=2, default=str) + "\n")
    return path


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "vllm", "numpy", "hnswlib", "open_clip"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:
            continue
    return out


def device_info() -> dict[str, Any]:
    import os

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    except ImportError:
        pass
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return None


def measured_cpu_limits(seconds: float = 0.6) -> dict[str, float]:
    """This CPU's achievable fp32 matmul FLOP/s and copy bandwidth (a measured stand-in for a
    datasheet peak, which a VM's CPU does not publish)."""
    import torch

    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    flops = n * 2 * 1024**3 / (time.perf_counter() - t0)
    x = torch.empty(64 * 2**20 // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        y.copy_(x)
        n += 1
    bw = n * 2 * x.numel() * 4 / (time.perf_counter() - t0)  # read + write
    return {"flops": flops, "bandwidth": bw, "name": f"this CPU (measured fp32 matmul / copy, "
                                                     f"{torch.get_num_threads()} threads)"}


def write_results(name: str, figures: dict[str, Any], table_md: str, plot: Any | None = None) -> dict[str, str]:
    """bench/results/<name>.json (with provenance) / .md / .png; returns the paths. One file per
    benchmark configuration, overwritten by each run: the README quotes it by name."""
    base = RESULTS / name
    paths = {"json": str(base.with_suffix(".json")), "md": str(base.with_suffix(".md"))}
    save_json(paths["json"], figures)
    prov = provenance()
    Path(paths["md"]).write_text(table_md + f"\n{prov['machine']['note']} (load {prov['machine']['load_avg_start']} "
                                 f"at the start, {prov['machine']['cores']} cores); commit "
                                 f"{prov['git']['commit'][:10]}{' (modified)' if prov['git']['dirty'] else ''}, "
                                 f"{prov['created']}\n")
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            fig = plot()
            paths["png"] = str(base.with_suffix(".png"))
            fig.savefig(paths["png"], dpi=120, bbox_inches="tight")
        except ImportError:
            pass
    return paths
