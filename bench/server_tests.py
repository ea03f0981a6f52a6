"""The figures of the slow server load and fault tests, into a result file.

    python -m bench server-tests [--seconds 60] [--clients 8] [--out PATH]

Runs `pytest -q -s tests/test_server_load.py` (8 clients for 60 s against the tiny-model server;
an external vLLM server killed mid-run) with $CROPPER_LOAD_REPORT set, and writes what the tests
report, with their exit status, to bench/results/server_load_tests.json. The tests assert the
behaviour (nothing lost or mixed up, 503s while the VLM server is down, recovery); the figures are
what they measured. The fault test needs .venv-vllm: the tests run with CI set, so a vLLM server
that does not come up fails them (and this step) instead of leaving its figures out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, save_json  # noqa: E402  (first: it notes the load at the start)

DEFAULT_OUT = RESULTS / "server_load_tests.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="the load test's window")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "CI": "true", "CROPPER_LOAD_REPORT": str(report), "CROPPER_LOAD_SECONDS": str(a.seconds),
               "CROPPER_LOAD_CLIENTS": str(a.clients),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_server_load.py"]
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    if rc == 0 and {r.get("test") for r in rows} != {"load", "fault"}:
        rc = 1  # a test that ran without reporting its figures
    figures: dict = {"what": "the slow server tests' figures (tests/test_server_load.py)",
                     "pytest_exit_status": rc, "passed": rc == 0, "clients": a.clients, "window_s": a.seconds}
    for row in rows:
        figures[row.pop("test")] = row
    save_json(a.out, figures)
    print(json.dumps(figures))
    return rc


if __name__ == "__main__":
    sys.exit(main())
