"""The documented Python examples run as written (so they cannot rot): every ```python block of
the Python page (docs/python.md, or a "## Python" section of the README, wherever it is), in
order, in one namespace, in a folder holding the sample photos."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON_PAGE = ROOT / "docs" / "python.md"


def python_blocks(section: str = "## Python") -> list[str]:
    """The examples of the Python page (all of docs/python.md), else of the README's section."""
    if PYTHON_PAGE.exists():
        text = PYTHON_PAGE.read_text(encoding="utf-8")
    else:
        text = README.read_text(encoding="utf-8")
        start = text.index(f"\n{section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start:end if end > 0 else None]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(photos, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 4
    (tmp_path / "samples").mkdir()
    for p in photos:
        shutil.copy(p, tmp_path / "samples" / p.name)
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, code in enumerate(blocks):
            exec(compile(code, f"docs/python.md python block {i + 1}", "exec"), ns)
    printed = out.getvalue()
    # what the examples say they do
    assert re.search(r"CropBox\(x1=\d+, y1=\d+, x2=\d+, y2=\d+\) [0-9.]+ no-vlm", printed), printed
    with Image.open("astronaut_16x9.jpg") as im:
        assert im.size[0] <= 640 and im.size[1] <= 360 and abs(im.size[0] / im.size[1] - 16 / 9) < 0.02
    assert str(ns["square"].ratio) == "1:1" and str(ns["wide"].ratio) == "16:9"
    assert ns["cat"].task.value == "ratio" and ns["rocket"].task.value == "free"
    assert sorted(p.name for p in Path("thumbs").iterdir()) == sorted(p.name for p in photos)
    assert "skipped: samples/missing.jpg: no such file" in printed
    assert "bad aspect ratio '16-9': write it as W:H, e.g. 16:9 or 1:1" in printed
    assert ns["fast"].config.vlm.model == "none" and ns["fast"].config.retrieval.examples == 10
