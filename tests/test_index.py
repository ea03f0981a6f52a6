"""The on-disk example index (build, load, query, append, atomic writes) and crop selection."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cropper_engine.data.example import Example
from cropper_engine.errors import ExampleIndexError, InputError
from cropper_engine.index import store
from cropper_engine.index.select import mask_center, mask_center_distance, select_crops
from cropper_engine.index.store import ExampleIndex, Neighbour
from cropper_engine.types import Box, Ratio, Task


class FakeEmbedder:
    """Mean colour and a few coarse cells through a fixed random projection, L2-normalised."""

    def __init__(self, id: str = "fake-embedder-v1", dim: int = 16, seed: int = 0) -> None:
        self.id = id
        self.dim = dim
        self.proj = np.random.default_rng(seed).standard_normal((12, dim)).astype(np.float32)
        self.calls = 0

    def embed(self, images: list[Any]) -> np.ndarray:
        self.calls += 1
        feats = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((2, 2)), dtype=np.float32) / 255.0
            feats.append(a.reshape(-1) - 0.5)
        v = np.asarray(feats, dtype=np.float32) @ self.proj
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "dim": self.dim, "preprocessing": {"resize": 2}}


def _examples(tmp_path: Path, n: int, start: int = 0, seed: int = 1) -> list[Example]:
    rng = np.random.default_rng(seed + start)
    out = []
    for i in range(start, start + n):
        arr = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        out.append(Example(id=f"ex{i}", image_path=str(path), width=12, height=8,
                           crops=[Box(0, 0, 6, 4), Box(2, 2, 12, 8)], scores=[0.1, 0.9]))
    return out


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, list[Example], FakeEmbedder]:
    emb = FakeEmbedder()
    exs = _examples(tmp_path, 40)
    out = tmp_path / "idx"
    report = ExampleIndex.build(exs, emb, out, batch_size=7, source={"kind": "test"})
    assert report.count == 40 and not report.skipped
    return out, exs, emb


def test_round_trip(built: tuple[Path, list[Example], FakeEmbedder]) -> None:
    out, exs, emb = built
    assert sorted(p.name for p in out.iterdir()) == ["graph.bin", "manifest.json", "metadata.jsonl",
                                                      "vectors.npy"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".idx")]  # no temp left over
    idx = ExampleIndex.load(out, emb)
    assert len(idx) == 40
    assert idx.example(3) == exs[3]
    manifest = idx.info()
    assert manifest["format_version"] == 1 and manifest["embedder"]["id"] == emb.id
    assert manifest["space"] == "ip" and manifest["source"] == {"kind": "test"}
    assert manifest["files"]["vectors.npy"] > 0 and manifest["count"] == 40
    # each image finds itself first, with similarity ~1
    res = idx.query_images([exs[5].image_path, Image.open(exs[9].image_path)], emb, k=4)
    assert [r[0].id for r in res] == ["ex5", "ex9"]
    assert res[0][0] == Neighbour(5, "ex5", pytest.approx(1.0, abs=1e-5))
    sims = [n.similarity for n in res[0]]
    assert sims == sorted(sims, reverse=True) and len(res[0]) == 4
    assert idx.find("ex7") == 7 and idx.find("nope") is None
    assert idx.embedder_spec() is None


def test_embedder_spec_recorded(tmp_path: Path) -> None:
    emb = FakeEmbedder()
    emb.spec = "fake:v1"  # type: ignore[attr-defined]  # what models.embedders sets
    ExampleIndex.build(_examples(tmp_path, 3), emb, tmp_path / "idx")
    idx = ExampleIndex.load(tmp_path / "idx", emb)
    assert idx.embedder_spec() == "fake:v1" and idx.info()["embedder"]["preprocessing"] == {"resize": 2}


def test_exact_and_hnsw_agree(built: tuple[Path, list[Example], FakeEmbedder]) -> None:
    out, _, emb = built
    idx = ExampleIndex.load(out, emb.id)
    q = np.random.default_rng(5).standard_normal((6, emb.dim)).astype(np.float32)
    exact = idx.query(q, 10, exact=True)
    approx = idx.query(q, 10, exact=False)
    assert [[n.row for n in r] for r in exact] == [[n.row for n in r] for r in approx]
    for a, b in zip(exact, approx, strict=True):
        assert [n.similarity for n in a] == pytest.approx([n.similarity for n in b], abs=1e-5)
    # a single [D] vector, and k larger than the index
    assert len(idx.query(q[0], 100)[0]) == 40


def test_exclude(built: tuple[Path, list[Example], FakeEmbedder]) -> None:
    out, exs, emb = built
    idx = ExampleIndex.load(out, emb)
    v = np.asarray(idx.vectors[5])
    for exact in (True, False):
        res = idx.query(v, 5, exact=exact, exclude={"ex5"})[0]
        assert len(res) == 5 and "ex5" not in [n.id for n in res]
        assert res == idx.query(v, 6, exact=exact)[0][1:]
        by_row = idx.query(v, 5, exact=exact, exclude=lambda row: row % 2 == 1)[0]
        assert len(by_row) == 5 and all(n.row % 2 == 0 for n in by_row)
    everything_but_one = {e.id for e in exs} - {"ex2"}
    assert [n.id for n in idx.query(v, 5, exclude=everything_but_one)[0]] == ["ex2"]


def test_crash_mid_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = FakeEmbedder()
    exs = _examples(tmp_path, 10)

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(store.os, "replace", boom)  # dies after the files, before the rename
    with pytest.raises(RuntimeError, match="simulated"):
        ExampleIndex.build(exs, emb, tmp_path / "idx")
    monkeypatch.undo()
    assert not (tmp_path / "idx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx")]
    with pytest.raises(ExampleIndexError, match="no example index"):
        ExampleIndex.load(tmp_path / "idx")


def test_crash_mid_overwrite_keeps_old_index(built: tuple[Path, list[Example], FakeEmbedder],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out, _, emb = built
    new = _examples(out.parent, 5, start=100)

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(store.np, "save", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        ExampleIndex.build(new, emb, out, overwrite=True)
    monkeypatch.undo()
    idx = ExampleIndex.load(out, emb)
    assert len(idx) == 40 and idx.example(0).id == "ex0"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".idx")]
    # the same overwrite without a crash replaces it
    ExampleIndex.build(new, emb, out, overwrite=True)
    assert len(ExampleIndex.load(out, emb)) == 5


def test_failed_swap_restores_old_index(built: tuple[Path, list[Example], FakeEmbedder],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out, _, emb = built
    real_replace = store.os.replace

    def replace(src: Any, dst: Any) -> None:
        if ".idx.tmp-" in str(src) and Path(dst) == out:  # the old index is already aside
            raise OSError("simulated failure of the final rename")
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        ExampleIndex.build(_examples(out.parent, 3, start=300), emb, out, overwrite=True)
    monkeypatch.undo()
    assert len(ExampleIndex.load(out, emb)) == 40
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".idx")]


def test_half_written_dir_does_not_load(built: tuple[Path, list[Example], FakeEmbedder]) -> None:
    out, _, _ = built
    (out / "manifest.json").unlink()  # what a crash before the last write would leave
    with pytest.raises(ExampleIndexError, match=r"no manifest\.json"):
        ExampleIndex.load(out)


def test_overwrite_refused(built: tuple[Path, list[Example], FakeEmbedder], tmp_path: Path) -> None:
    out, exs, emb = built
    with pytest.raises(ExampleIndexError, match="--overwrite"):
        ExampleIndex.build(exs[:3], emb, out)
    assert emb.calls == 6  # refused before embedding anything (40 rows in batches of 7)
    other = tmp_path / "not-an-index"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ExampleIndexError, match="not an example index"):
        ExampleIndex.build(exs[:3], emb, other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


def test_add_appends(built: tuple[Path, list[Example], FakeEmbedder]) -> None:
    out, exs, emb = built
    idx = ExampleIndex.load(out, emb)
    created = idx.manifest["created"]
    new = _examples(out.parent, 6, start=200)
    report = idx.add([*new, exs[0]], emb)  # ex0 is already there
    assert report.count == 6 and report.total == 46 and len(report.skipped) == 1
    assert len(idx) == 46 and idx.example(45).id == "ex205"
    again = ExampleIndex.load(out, emb)
    assert len(again) == 46 and again.manifest["created"] == created
    for exact in (True, False):
        hits = again.query_images([new[2].image_path], emb, k=1, exact=exact)
        assert hits[0][0].id == "ex202"
    assert again.query_images([exs[1].image_path], emb, k=1, exact=False)[0][0].id == "ex1"
    with pytest.raises(ExampleIndexError, match="other-embedder"):
        again.add(new, FakeEmbedder(id="other-embedder"))


def test_embedder_mismatch(built: tuple[Path, list[Example], FakeEmbedder]) -> None:
    out, _, _ = built
    with pytest.raises(ExampleIndexError) as err:
        ExampleIndex.load(out, FakeEmbedder(id="clip-vit-b-32/openai", dim=16))
    msg = str(err.value)
    assert "fake-embedder-v1" in msg and "clip-vit-b-32/openai" in msg
    assert "--embedder fake-embedder-v1" in msg and "Rebuild" in msg
    with pytest.raises(ExampleIndexError, match="dim 8"):
        ExampleIndex.load(out, FakeEmbedder(dim=8))
    with pytest.raises(ExampleIndexError, match="other"):
        ExampleIndex.load(out, "other")


def test_corrupt_manifest(built: tuple[Path, list[Example], FakeEmbedder]) -> None:
    out, _, _ = built
    manifest = out / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(ExampleIndexError, match="corrupt") as err:
        ExampleIndex.load(out)
    assert str(out) in str(err.value) and "--overwrite" in str(err.value)
    manifest.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(ExampleIndexError, match="format version 99"):
        ExampleIndex.load(out)
    manifest.write_text(json.dumps({**good, "count": 41}))
    with pytest.raises(ExampleIndexError, match="41"):
        ExampleIndex.load(out)


def test_bad_images_skipped(tmp_path: Path) -> None:
    emb = FakeEmbedder()
    exs = _examples(tmp_path, 5)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    exs.insert(2, Example("bad1", str(tmp_path / "broken.jpg"), 10, 10, [Box(0, 0, 5, 5)]))
    exs.append(Example("bad2", str(tmp_path / "missing.png"), 10, 10, [Box(0, 0, 5, 5)]))
    seen: list[str] = []
    report = ExampleIndex.build(exs, emb, tmp_path / "idx", on_error=seen.append)
    assert report.count == 5 and len(report.skipped) == 2 and seen == report.skipped
    assert "bad1" in report.skipped[0] and "missing.png" in report.skipped[1]
    idx = ExampleIndex.load(tmp_path / "idx", emb)
    assert [idx.example(i).id for i in range(len(idx))] == ["ex0", "ex1", "ex2", "ex3", "ex4"]
    with pytest.raises(ExampleIndexError, match="no example could be embedded"):
        ExampleIndex.build(exs[2:3], emb, tmp_path / "idx2")


def test_from_vectors_and_query_checks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((30, 8)).astype(np.float32) * 3  # not unit: normalised on write
    rows = [{"id": f"r{i}", "image": "", "width": 1, "height": 1, "crops": []} for i in range(30)]
    idx = ExampleIndex.from_vectors(v, rows, tmp_path / "v", embedder={"id": "e", "dim": 8}, M=8,
                                    ef_construction=40, ef=20)
    assert np.allclose(np.linalg.norm(idx.vectors, axis=1), 1, atol=1e-5)
    assert idx.query(v[3], 1, exact=False)[0][0].id == "r3"
    with pytest.raises(InputError, match=r"\[Q, 8\]"):
        idx.query(np.zeros(5, np.float32), 3)
    with pytest.raises(InputError, match="unique"):
        ExampleIndex.from_vectors(v[:2], [rows[0], rows[0]], tmp_path / "w", embedder={"id": "e", "dim": 8})


# --- crop selection ---------------------------------------------------------------------


def _ex(**kw: Any) -> Example:
    base = dict(id="e", image_path="e.jpg", width=200, height=100,
                crops=[Box(0, 0, 100, 100), Box(0, 0, 200, 100), Box(50, 0, 150, 75), Box(0, 0, 160, 90)],
                scores=[3.0, 4.5, 2.0, 4.5])
    return Example(**{**base, **kw})  # type: ignore[arg-type]


def test_select_free() -> None:
    ex = _ex()
    got = select_crops(ex, Task.FREE, 3)
    assert [s for _, s in got] == [4.5, 4.5, 3.0]
    assert [b for b, _ in got] == [ex.crops[1], ex.crops[3], ex.crops[0]]  # ties keep given order
    unscored = _ex(scores=None)
    assert select_crops(unscored, "free", 2) == [(unscored.crops[0], None), (unscored.crops[1], None)]
    assert len(select_crops(ex, Task.FREE, 10)) == 4
    with pytest.raises(InputError):
        select_crops(ex, Task.FREE, 0)


def test_select_ratio() -> None:
    ex = _ex()  # aspects: 1.0, 2.0, 1.333, 1.778
    # 1:1 and 16:9 are equally far from 4:3 in log-ratio (4/3 / 1 = 16/9 / 4/3): MOS breaks the tie
    got = select_crops(ex, Task.RATIO, 3, ratio=Ratio(4, 3))
    assert [b for b, _ in got] == [ex.crops[2], ex.crops[3], ex.crops[0]]
    assert select_crops(ex, Task.RATIO, 1, ratio=Ratio(16, 9))[0] == (ex.crops[3], 4.5)
    # and so are 1:1 and 4:1 from 2:1
    tie = _ex(crops=[Box(0, 0, 100, 100), Box(0, 0, 200, 50)], scores=[1.0, 2.0])
    assert select_crops(tie, Task.RATIO, 1, ratio=Ratio(2, 1))[0][1] == 2.0
    with pytest.raises(InputError, match="ratio"):
        select_crops(ex, Task.RATIO, 1)


def test_select_subject() -> None:
    ex = _ex(mask_box=Box(100, 50, 140, 90))  # centre (120, 70) -> unit (0.6, 0.7)
    assert mask_center_distance(ex, (0.6, 0.7)) == pytest.approx(0.0)
    assert mask_center_distance(ex, (0.6, 0.3)) == pytest.approx(0.4)
    assert mask_center_distance(_ex(), (0.5, 0.5)) is None
    # one mask for all crops: MOS decides
    assert [s for _, s in select_crops(ex, Task.SUBJECT, 2, mask_center_unit=(0.1, 0.1))] == [4.5, 4.5]
    # one subject per crop (SACD): the crop whose subject is nearest the query's comes first
    per_crop = _ex(extra={"mask_boxes": [[0, 0, 20, 20], [180, 80, 200, 100], None, [90, 40, 110, 60]]})
    got = select_crops(per_crop, Task.SUBJECT, 4, mask_center_unit=(0.95, 0.9))
    assert [b for b, _ in got] == [per_crop.crops[1], per_crop.crops[3], per_crop.crops[0], per_crop.crops[2]]
    assert mask_center_distance(per_crop, (0.5, 0.5)) == pytest.approx(0.0)
    with pytest.raises(InputError, match="mask"):
        select_crops(ex, Task.SUBJECT, 1)


def test_mask_center() -> None:
    m = np.zeros((10, 20), bool)
    m[2:4, 5:15] = True
    assert mask_center(m) == (pytest.approx(0.5), pytest.approx(0.3))
    assert math.isclose(mask_center(np.ones((4, 4), bool))[0], 0.5)


def _flip(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place: the file keeps its size (a size check cannot see it)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    assert path.stat().st_size == size


def test_a_vectors_file_damaged_without_changing_size_is_named_at_load(built) -> None:
    out, _exs, emb = built
    _flip(out / "vectors.npy", (out / "vectors.npy").stat().st_size - 40, b"\x7f\x7f\x7f\x7f" * 4)
    with pytest.raises(ExampleIndexError, match=r"vectors.npy is damaged: row 39 is not a unit vector.*index build"):
        ExampleIndex.load(out, emb)


def test_metadata_damaged_without_changing_size_is_named_at_load(built) -> None:
    out, _exs, emb = built
    text = (out / "metadata.jsonl").read_bytes()
    at = text.index(b"ex7")
    _flip(out / "metadata.jsonl", at, b"ex9")  # still valid JSON, another id: only the checksum sees it
    with pytest.raises(ExampleIndexError, match="metadata.jsonl is damaged: its checksum"):
        ExampleIndex.load(out, emb)


def test_a_graph_damaged_without_changing_size_fails_verify_and_add(built, tmp_path) -> None:
    """`index info` (verify) names a graph damaged in place; `index add` refuses to extend it (it
    would write new checksums over the damage)."""
    out, _exs, emb = built
    graph = out / "graph.bin"
    _flip(graph, graph.stat().st_size // 2, b"\x00\x01\x02\x03")
    idx = ExampleIndex.load(out, emb)
    with pytest.raises(ExampleIndexError, match="graph.bin is damaged: its checksum"):
        idx.verify()
    with pytest.raises(ExampleIndexError, match="graph.bin is damaged: its checksum"):
        idx.add(_examples(tmp_path, 3, start=100), emb)
    with pytest.raises(ExampleIndexError, match="graph.bin is damaged"):
        ExampleIndex.load(out, emb).verify()  # still named: nothing was rewritten


def test_names_that_are_not_utf8_are_stored(tmp_path) -> None:
    """A file name with bytes that are not UTF-8 (surrogate escapes in Python) is written as
    ASCII JSON and read back the same."""
    emb = FakeEmbedder()
    exs = _examples(tmp_path, 3)
    odd = tmp_path / "caf\udce9.png"
    Path(exs[0].image_path).rename(odd)
    exs[0] = Example(id="caf\udce9", image_path=str(odd), width=12, height=8, crops=exs[0].crops,
                     scores=exs[0].scores)
    ExampleIndex.build(exs, emb, tmp_path / "idx", subjects="none")
    idx = ExampleIndex.load(tmp_path / "idx", emb)
    assert idx.example(idx.find("caf\udce9")).image_path == str(odd)
