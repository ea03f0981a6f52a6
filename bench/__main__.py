"""`python -m bench NAME [args]`: the benchmarks, one entry point.

    python -m bench all [--quick]                 every figure README.md and docs/ quote (about 90 min)
    python -m bench readme [--write]              the figure blocks of README.md and docs/ (check / rewrite)
    python -m bench loop [--quick] [--out] ...    the engine's loop against the naive reference
    python -m bench index [--quick] [--out]       the example index (build, query, recall, load), embedders
    python -m bench cost [--device h100] [--out]  the cost model's limits at full size
    python -m bench default [--quick] [--out]     the no-VLM default's speed per stage, beside smartcrop.py
    python -m bench subject [--quick] [--out P]   face and person detection, ms per 1024-px image
    python -m bench serve [--backend openai]      the HTTP service under 1, 4 and 16 clients
    python -m bench memory                        the service's resident memory under 12 uploads of 88 MP
    python -m bench faces [--quick] [--out]       people stay in the picture: main faces kept, FCDB images with faces
    python -m bench persons                       do FCDB's human crops keep whole persons, as they keep faces?
    python -m bench fullsize [--shape tiny]       the engine at Idefics2-8B's real shape (random weights, GPU)
    python -m bench eval                          FCDB val: the baselines and the no-VLM default (IoU, Disp)
    python -m bench cv                            FCDB train 5-fold CV of the no-VLM default's trees
    python -m bench ranker-study [--cache F]      other ranker set-ups and crop choices, same CV (~30 min)
    python -m bench server-tests                  the slow server load / fault tests' figures
    python -m bench style [--style tight45]       `cropper-engine fit` on a house style built from FCDB
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"loop": "bench.loop_bench", "index": "bench.index_bench", "cost": "bench.costmodel",
            "default": "bench.default_bench", "subject": "bench.subject_bench", "serve": "bench.serve_bench",
            "fullsize": "bench.fullsize", "eval": "bench.eval_bench", "cv": "bench.cv_bench",
            "server-tests": "bench.server_tests", "all": "bench.all", "readme": "bench.readme",
            "memory": "bench.memory_bench", "style": "bench.studies.style_experiment", "faces": "bench.face_bench",
            "ranker-study": "bench.studies.ranker_study",
            "persons": "bench.studies.person_study"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(__doc__)
        sys.exit(0)
    if sys.argv[1] not in COMMANDS:
        print(f"unknown benchmark {sys.argv[1]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    name = sys.argv.pop(1)
    sys.argv[0] = f"python -m bench {name}"
    mod = importlib.import_module(COMMANDS[name])
    rc = mod.main()
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
