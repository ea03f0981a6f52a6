"""Resident memory of `cropper-engine serve` (default settings) under concurrent uploads of
huge, tiny PNGs: N clients each upload at once a PNG of 88 megapixels that is a few KB on the
wire (1-bit, one colour: what a decompression-bomb-like upload looks like), and the server's
resident memory is sampled every 20 ms from /proc (Linux) until all have answered.

    python -m bench memory                 # 12 uploads of 88 MP (the figure in the README)
    python -m bench memory --clients 4 --megapixels 40 --no-write

Prints the figures and writes bench/results/serve_memory.json (unless --no-write). The server
runs as a subprocess on 127.0.0.1 and is stopped at the end; each upload has a 300 s time-out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def big_png(width: int, height: int, *, bit_depth: int = 1) -> bytes:
    """A grey PNG of width x height, all black, written row by row (nothing decoded is ever held):
    a 1-bit 88 MP one is about 11 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" + bytes((width * bit_depth + 7) // 8)  # filter byte 0, then zero samples
    z = zlib.compressobj(9)
    parts = []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(clients: int = 12, megapixels: float = 88.0, timeout_s: float = 300.0,
        extra_args: list[str] | None = None) -> dict[str, Any]:
    """Start the server, send the uploads at once, sample its memory; the figures as a dict."""
    import httpx

    w = 11_000
    h = max(1, round(megapixels * 1e6 / w))
    data = big_png(w, h)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env = {k: v for k, v in env.items() if not k.startswith("CROPPER_")}  # default settings
    cmd = [sys.executable, "-m", "cropper_engine.cli", "serve", "--port", str(port), "--log-level", "warning",
           *(extra_args or [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    samples: list[int] = []
    stop = threading.Event()
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 120:
                raise RuntimeError("the server was not ready within 120 s")
            time.sleep(0.2)
        base = rss_bytes(proc.pid)

        def sample() -> None:
            while not stop.is_set():
                samples.append(rss_bytes(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results: list[tuple[int, float, str]] = [(0, 0.0, "")] * clients

        def one(i: int) -> None:
            t = time.perf_counter()
            try:
                r = httpx.post(url + "/v1/crop", files={"image": (f"huge-{i}.png", data, "image/png")},
                               timeout=timeout_s)
                results[i] = (r.status_code, time.perf_counter() - t, r.text[:200])
            except httpx.HTTPError as exc:
                results[i] = (0, time.perf_counter() - t, f"{type(exc).__name__}: {exc}")

        t_start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s + 10)
        wall = time.perf_counter() - t_start
        time.sleep(2.0)  # what stays resident once the burst is over
        after = rss_bytes(proc.pid)
        stop.set()
        sampler.join(1)
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    statuses: dict[str, int] = {}
    for code, _, _ in results:
        statuses[str(code)] = statuses.get(str(code), 0) + 1
    return {
        "clients": clients, "image": f"{w}x{h} PNG, 1-bit grey ({w * h / 1e6:.1f} MP, {len(data)} bytes)",
        "server": "cropper-engine serve (default settings" + (f", {' '.join(extra_args)}" if extra_args else "")
                  + ")",
        "rss_before_mb": round(base / 2**20), "rss_peak_mb": round(max(samples or [0]) / 2**20),
        "rss_after_mb": round(after / 2**20), "statuses": statuses,
        "seconds_wall": round(wall, 1), "seconds_max_request": round(max(r[1] for r in results), 1),
        "errors": [r[2] for r in results if r[0] != 200][:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--megapixels", type=float, default=88.0)
    ap.add_argument("--no-write", action="store_true", help="print only; bench/results is left alone")
    ap.add_argument("--out", default=None, help="[default: bench/results/serve_memory.json]")
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 0.1 <= args.megapixels <= 500:
        ap.error("--clients must be in 1..64 and --megapixels in 0.1..500")
    sys.path.insert(0, str(ROOT))
    from bench.common import RESULTS, save_json

    out = run(args.clients, args.megapixels)
    print(json.dumps(out, indent=2))
    if not args.no_write:
        path = save_json(args.out or RESULTS / "serve_memory.json", out)
        print(f"wrote {path}")

if __name__ == "__main__":
    main()
