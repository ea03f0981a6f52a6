"""The server's resident memory stays bounded under a burst of huge uploads (slow, bounded).

Twelve clients upload at once a PNG of 88 megapixels that is 11 KB on the wire, to
`cropper-engine serve` as a real process on 127.0.0.1 at its default settings: all are answered
and the server's resident memory stays under 2 GB (issue 12 measured 5.07 GB before the pixel budget).
`python -m bench memory` runs the same and writes bench/results/serve_memory.json.
"""

from __future__ import annotations

import sys

import pytest
from needs import need_module

need_module("httpx", "the server extra (httpx)", module_level=True)
need_module("uvicorn", "the server extra (uvicorn)", module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def test_twelve_88_megapixel_uploads_stay_under_2_gb():
    from bench.memory_bench import run

    out = run(clients=12, megapixels=88.0, timeout_s=300.0)
    # all twelve are cropped, as the README says: they run one at a time within the pixel budget
    # (120 MP: 88 MP each), the last well within server.decode_wait_s (120 s) of its arrival
    assert out["statuses"] == {"200": 12}, out
    assert out["seconds_max_request"] < 120, out
    assert out["rss_peak_mb"] < 2048, out
    assert out["rss_before_mb"] < out["rss_peak_mb"]  # the sampler saw the burst
