"""A real vLLM OpenAI-compatible server from .venv-vllm on 127.0.0.1, for the slow tests. One that is
not installed or does not come up is `needs.missing`: a skip on a developer's machine, a failure in CI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from needs import missing

ROOT = Path(__file__).resolve().parents[1]
# the interpreter of .venv-vllm (CROPPER_VLLM_PYTHON: another one, e.g. a checkout's without its own venvs)
VLLM_PY = Path(os.environ.get("CROPPER_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
START_S = float(os.environ.get("CROPPER_TEST_VLLM_START_S", "240"))  # read here: conftest hides CROPPER_*


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, port: int, log_path: Path, extra: Sequence[str] = ()) -> subprocess.Popen:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group, loopback only; `extra`
    arguments come last (an option given again there wins). The server sees this process's environment
    (PYTHONPATH included: a checkout's cropper_engine.vllm_plugin is the one vLLM loads)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
           "--limit-mm-per-prompt", json.dumps({"image": 16}), "--max-num-seqs", "32", "--enforce-eager",
           # vllm-cpu: a chunked prefill of a seeded request rewinds a CPU generator, which kills the engine
           "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096", *extra]
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def start_up(model_dir: Path, port: int, log_path: Path, timeout: float | None = None,
             extra: Sequence[str] = ()) -> subprocess.Popen:
    """`start`, then wait until it answers; not installed, or not up in time (or dead): `missing`."""
    if not VLLM_PY.exists():
        missing(".venv-vllm (vllm-cpu) is not installed: make install-vllm")
    timeout = timeout or START_S
    proc = start(model_dir, port, log_path, extra)
    if not wait_up(port, proc, timeout):
        stop(proc)
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        first = text.find("Traceback")  # the root cause, not only the shutdown that follows it
        excerpt = text[first:first + 3000] if first >= 0 else text[-1500:]
        missing(f"the vLLM server did not come up in {timeout:.0f} s (exit status {proc.returncode}; is "
                f"cropper_engine installed in .venv-vllm for the Idefics2 plugin?); its log:\n{excerpt}")
    return proc


def wait_up(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    """True once /v1/models answers; False if the process dies or the time runs out."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server's whole process group (API server and engine), then make sure it is gone."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
