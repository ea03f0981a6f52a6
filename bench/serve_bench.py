"""Throughput and latency of `cropper-engine serve` at 1, 4 and 16 concurrent clients: dynamic
batching (batches of up to 16) against batch size 1, side by side.

    python bench/serve_bench.py                  # the tiny Idefics2 on the transformers backend
    python bench/serve_bench.py --quick          # shorter windows
    python bench/serve_bench.py --vlm none       # the no-VLM pipeline
    python bench/serve_bench.py --backend openai # the tiny Idefics2 in a vLLM server (.venv-vllm),
                                                 # started here unless --vlm-url names one

Both servers run as subprocesses on 127.0.0.1 (started once, both kept up); the levels are run
interleaved (batched c=1, single c=1, batched c=4, ...) so that drifts of a shared machine's load
hit both alike. Clients are closed loops (one request in flight each) uploading distinct JPEGs
(multipart); a level counts the requests completed inside its window. Results: a table on stdout
and JSON in bench/results/serve_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, save_json  # noqa: E402  (first: it notes the load at the start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Images:
    """The i-th image of the run, made on demand: a distinct crop and scaling of a sample photo."""

    def __init__(self) -> None:
        from PIL import Image

        from cropper_engine.samples import write_samples

        with tempfile.TemporaryDirectory() as d:
            self.base = [Image.open(p).convert("RGB") for p in write_samples(Path(d))]

    def __getitem__(self, i: int) -> bytes:
        rng = np.random.default_rng(i)
        im = self.base[i % len(self.base)]
        w, h = im.size
        x1, y1 = int(rng.integers(0, w // 5)), int(rng.integers(0, h // 5))
        x2, y2 = w - int(rng.integers(0, w // 5)), h - int(rng.integers(0, h // 5))
        crop = im.crop((x1, y1, x2, y2))
        s = float(rng.uniform(0.7, 1.2))
        crop = crop.resize((max(64, int(crop.width * s)), max(64, int(crop.height * s))))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        return buf.getvalue()


class Server:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "cropper_engine.cli", "serve", "--port", str(self.port), "--log-level",
               "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} server exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"{self.name} server not ready after {timeout} s")

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for key in ("cropper_batch_size_sum", "cropper_batch_size_count"):
            m = re.search(rf"^{key} ([0-9.e+]+)$", text, re.M)
            out[key] = float(m.group(1)) if m else 0.0
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def run_level(url: str, clients: int, duration: float, imgs: Images, form: dict[str, str],
                    offset: int = 0) -> dict[str, object]:
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    pipelines: dict[str, int] = {}
    errors: list[str] = []
    t0 = time.perf_counter()
    end = t0 + duration
    counter = [offset]

    async def client(ac: httpx.AsyncClient) -> None:
        while time.perf_counter() < end:
            i = counter[0]
            counter[0] += 1
            data = imgs[i]
            t = time.perf_counter()
            try:
                r = await ac.post(url + "/v1/crop", files={"image": (f"b{i}.jpg", data, "image/jpeg")}, data=form)
                code = r.status_code
                if code == 200:
                    p = r.json().get("pipeline", "?")
                    pipelines[p] = pipelines.get(p, 0) + 1
            except httpx.HTTPError as exc:
                code = -1
                errors.append(f"{type(exc).__name__}: {exc}")
            done = time.perf_counter()
            if done <= end:  # completed inside the window
                codes[code] = codes.get(code, 0) + 1
                if code == 200:
                    lat.append(done - t)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as ac:
        await asyncio.gather(*(client(ac) for _ in range(clients)))
    ok = codes.get(200, 0)
    arr = np.asarray(lat) if lat else None
    return {
        "clients": clients, "seconds": duration, "ok": ok, "errors": sum(v for k, v in codes.items() if k != 200),
        "codes": {str(k): v for k, v in sorted(codes.items())}, "rps": ok / duration,
        "p50_s": float(np.percentile(arr, 50)) if arr is not None else float("nan"),
        "p99_s": float(np.percentile(arr, 99)) if arr is not None else float("nan"),
        "mean_s": float(arr.mean()) if arr is not None else float("nan"), "client_errors": errors[:5],
        "pipelines": pipelines, "latencies": lat,
    }


def merge(parts: list[dict[str, object]]) -> dict[str, object]:
    """Two half windows of one mode -> one level's figures."""
    lat = np.asarray([x for p in parts for x in p["latencies"]])  # type: ignore[union-attr]
    seconds = sum(float(p["seconds"]) for p in parts)  # type: ignore[arg-type]
    ok = sum(int(p["ok"]) for p in parts)  # type: ignore[arg-type]
    codes: dict[str, int] = {}
    pipes: dict[str, int] = {}
    for p in parts:
        for k, v in p["codes"].items():  # type: ignore[union-attr]
            codes[k] = codes.get(k, 0) + v
        for k, v in p["pipelines"].items():  # type: ignore[union-attr]
            pipes[k] = pipes.get(k, 0) + v
    batches = sum(float(p["batches"]) for p in parts)  # type: ignore[arg-type]
    return {
        "clients": parts[0]["clients"], "seconds": seconds, "ok": ok, "rps": ok / seconds,
        "errors": sum(int(p["errors"]) for p in parts), "codes": codes, "pipelines": pipes,  # type: ignore[arg-type]
        "p50_s": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_s": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "mean_s": float(lat.mean()) if len(lat) else float("nan"),
        "mean_batch": sum(float(p["batch_sum"]) for p in parts) / batches if batches else 0.0,  # type: ignore[arg-type]
        "halves_rps": [p["rps"] for p in parts],
    }


def start_vllm(model: str, work: Path) -> tuple[subprocess.Popen, str]:
    """`python -m vllm.entrypoints.openai.api_server` from .venv-vllm on a free loopback port."""
    import httpx

    py = Path(os.environ.get("CROPPER_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    if not py.exists():
        raise SystemExit(".venv-vllm is not installed (make install-vllm), or pass --vlm-url")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "128",
           "--limit-mm-per-prompt", json.dumps({"image": 16}), "--enforce-eager",
           # vllm-cpu: a chunked prefill of a seeded request rewinds a CPU generator, which kills the engine
           "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"]
    proc = subprocess.Popen(cmd, stdout=open(work / "vllm.log", "wb"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    t = time.monotonic()
    while time.monotonic() - t < 300:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited; see {work / 'vllm.log'}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                print(f"vLLM server up in {time.monotonic() - t:.0f} s", flush=True)
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the vLLM server did not come up in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlm", default="tiny", help="tiny (built here) | none | a model folder")
    ap.add_argument("--backend", default="transformers", help="transformers | openai (a vLLM server)")
    ap.add_argument("--vlm-url", default=None, help="openai backend: a running server (else one is started "
                                                     "from .venv-vllm with the model)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of each server (serve --threads); 1 is steadier on a shared machine")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds per level and mode")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--task", default="free", help="free | ratio (16:9)")
    ap.add_argument("--quick", action="store_true", help="20 s windows")
    ap.add_argument("--out", default=str(RESULTS / "serve_bench.json"))
    args = ap.parse_args()
    duration = 20.0 if args.quick else args.duration
    levels = [int(c) for c in args.clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    vlm = args.vlm
    if vlm == "tiny":
        from cropper_engine.models.tiny_vlm import make_tiny_idefics2

        vlm = str(make_tiny_idefics2(work / "tiny" / "idefics2"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CROPPER_VLM_BATCH_SIZE": str(args.max_batch),  # the VLM backend takes the whole batch at once
           "CROPPER_LOOP_KEEP_FACES": "off"}  # the serving path's figures; faces: bench/subject_bench.py
    common = ["--vlm", vlm, "--queue-size", "512", "--timeout", "900"]
    if vlm != "none":
        common += ["--backend", args.backend]
    if args.threads:
        common += ["--threads", str(args.threads)]
    vllm = None
    if args.backend == "openai":
        url = args.vlm_url
        if url is None:
            vllm, url = start_vllm(vlm, work)
        common += ["--vlm-url", url]
    modes = {
        "batched": Server("batched", [*common, "--max-batch", str(args.max_batch), "--batch-wait-ms",
                                      str(args.batch_wait_ms)], env, work),
        "single": Server("single", [*common, "--max-batch", "1", "--batch-wait-ms", "0"], env, work),
    }
    form = {"task": "ratio", "ratio": "16:9"} if args.task == "ratio" else {"task": "free"}
    # every request of the run gets an image of its own (no cache of the engine can help)
    per_level = 100_000
    imgs = Images()
    results: dict[str, list[dict[str, object]]] = {m: [] for m in modes}
    try:
        for s in modes.values():
            s.wait_ready()
        for s in modes.values():  # warm-up: first calls build caches
            asyncio.run(run_level(s.url, 2, min(6.0, duration / 3), imgs, form, offset=per_level * len(levels)))
        load0 = os.getloadavg()[0]
        for k, c in enumerate(levels):
            # A B B A, half a window each: a drift of the machine's load hits both modes alike
            names = list(modes)
            parts: dict[str, list[dict[str, object]]] = {n: [] for n in names}
            for j, name in enumerate([*names, *reversed(names)]):
                s = modes[name]
                before = s.metrics()
                r = asyncio.run(run_level(s.url, c, duration / 2, imgs, form, offset=per_level * k + 10_000 * j))
                after = s.metrics()
                n = after["cropper_batch_size_count"] - before["cropper_batch_size_count"]
                r["batch_sum"] = after["cropper_batch_size_sum"] - before["cropper_batch_size_sum"]
                r["batches"] = n
                parts[name].append(r)
            for name in names:
                r = merge(parts[name])
                results[name].append(r)
                print(f"{name:>8} c={c:<3} {r['rps']:6.2f} req/s  p50 {r['p50_s']:6.2f} s  p99 {r['p99_s']:6.2f} s"
                      f"  errors {r['errors']}  mean batch {r['mean_batch']:.1f}  {r['pipelines']}", flush=True)
    finally:
        for s in modes.values():
            s.stop()
        if vllm is not None:
            os.killpg(vllm.pid, 15)
            vllm.wait(60)
    print()
    print(f"{'clients':>7} | {'batched req/s':>13} {'p50':>6} {'p99':>6} | {'batch=1 req/s':>13} {'p50':>6} "
          f"{'p99':>6} | speed-up | errors")
    for b, s1 in zip(results["batched"], results["single"], strict=True):
        print(f"{b['clients']:>7} | {b['rps']:13.2f} {b['p50_s']:6.2f} {b['p99_s']:6.2f} | {s1['rps']:13.2f} "
              f"{s1['p50_s']:6.2f} {s1['p99_s']:6.2f} | {b['rps'] / max(s1['rps'], 1e-9):7.2f}x | "
              f"{b['errors']}/{s1['errors']}")
    out = {
        "vlm": args.vlm, "backend": args.backend if vlm != "none" else None, "task": args.task,
        "threads": args.threads,
        "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "duration_s": duration,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": load0,
                    "load_avg_at_end": os.getloadavg()[0]},
        "results": results,
    }
    save_json(args.out, out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
