"""`python -m bench NAME [args]`: the benchmarks, one entry point.

    python -m bench loop [--quick] [--out] ...    the engine's loop against the naive reference
    python -m bench index [--quick] [--out]       the example index (build, query, recall, load), embedders
    python -m bench cost [--device h100]          the cost model's limits at full size
    python -m bench default [--quick] [--out]     the no-VLM default pipeline's speed per stage, beside smartcrop.py
    python -m bench faces [--quick] [--out]       people stay in the picture: main faces kept, FCDB images with faces
    python -m bench subject [--quick]             face and person detection, ms per 1024-px image
    python -m bench serve                         the HTTP service under 1, 4 and 16 clients
    python -m bench fullsize [--shape tiny]       the engine at Idefics2-8B's real shape (random weights, GPU)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"loop": "bench.loop_bench", "index": "bench.index_bench", "cost": "bench.costmodel",
            "default": "bench.default_bench", "subject": "bench.subject_bench", "serve": "bench.serve_bench",
            "fullsize": "bench.fullsize"}
COMMANDS["faces"] = "bench.face_bench"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        sys.exit(0 if len(sys.argv) < 2 else 2)
    name = sys.argv.pop(1)
    sys.argv[0] = f"python -m bench {name}"
    mod = importlib.import_module(COMMANDS[name])
    mod.main()


if __name__ == "__main__":
    main()
