"""The in-context loop end to end on the tiny Idefics2 (transformers), its fallbacks, no-VLM."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cropper_engine.config import load_config
from cropper_engine.engine.loop import Cropper
from cropper_engine.errors import CropperError
from cropper_engine.models.base import Generation
from cropper_engine.types import CropRequest, Ratio, Task


@pytest.fixture(scope="module")
def tiny_vlm(tiny_dir):
    from cropper_engine.models.vlm_transformers import TransformersVLM

    return TransformersVLM(str(tiny_dir / "idefics2"), device="cpu", batch_size=4)


def make_cropper(cfg_over, tiny_clip, example_index, vlm):
    from cropper_engine.index.store import ExampleIndex

    cfg = load_config(env={}, overrides={"retrieval.examples": 3, "vlm.candidates": 3, "vlm.rounds": 2,
                                         **cfg_over})
    idx = ExampleIndex.load(example_index, embedder=tiny_clip)
    return Cropper.from_config(cfg, embedder=tiny_clip, index=idx, vlm=vlm)


def subject_mask(path):
    w, h = Image.open(path).size
    m = np.zeros((h, w), bool)
    m[h // 3: h // 2, w // 4: w // 2] = True
    return m


@pytest.mark.slow
def test_three_tasks_on_tiny_vlm_every_row_vlm(photos, tiny_clip, example_index, tiny_vlm):
    cropper = make_cropper({}, tiny_clip, example_index, tiny_vlm)
    reqs = [
        CropRequest(photos[0], Task.FREE),
        CropRequest(photos[1], Task.RATIO, ["1:1", "16:9"]),
        CropRequest(photos[2], Task.SUBJECT, mask=subject_mask(photos[2])),
    ]
    outs = cropper.crop_batch(reqs)
    rows = [r for out in outs for r in out]
    assert len(rows) == 4
    assert all(r.pipeline == "vlm" for r in rows), [(r.pipeline, r.notes) for r in rows]
    for r in rows:
        assert r.box.is_valid() and r.box.x1 >= 0 and r.box.x2 <= r.width and r.box.y2 <= r.height
        assert {c.round for c in r.candidates} == {0, 1, 2}  # L=2 refinement rounds ran
        assert r.extra["tokens"]["generated"] > 0 and r.extra["tokens"]["prompt"] > 0
        assert set(r.timings) >= {"decode", "embed", "retrieve", "generate", "score", "total"}
    ratio_rows = outs[1]
    for r, want in zip(ratio_rows, [Ratio(1, 1), Ratio(16, 9)], strict=True):
        assert r.ratio == want
        # exact ratio up to the 1-px rounding of the final box
        assert abs(r.box.width / r.box.height - want.value) < 2.5 / r.box.height * want.value
        for c in r.candidates:
            assert c.box.aspect == pytest.approx(want.value, rel=1e-6)
    subj = outs[2][0]
    m = subject_mask(photos[2])
    ys, xs = np.nonzero(m)
    assert subj.box.x1 <= xs.min() and subj.box.y1 <= ys.min()
    assert subj.box.x2 >= xs.max() + 1 and subj.box.y2 >= ys.max() + 1
    assert rows[0].extra["selected"]["mode"] == "final"


def test_an_image_is_never_its_own_example(photos, tiny_clip, example_index):
    """The index holds the query photos (under other ids than any request's): retrieval leaves
    out the query's own file, by path, whatever the ids."""
    from cropper_engine.engine.loop import _uuid
    from cropper_engine.models.base import ImagePart

    class Recording(ScriptedVLM):
        def generate(self, conversations, params):
            self.seen.append({p.uuid for conv in conversations for m in conv for p in m.content
                              if isinstance(p, ImagePart) and p.uuid})
            return super().generate(conversations, params)

    vlm = Recording(["(4, 100, 100, 900, 900)"] * 20)
    vlm.seen = []
    cropper = make_cropper({"retrieval.examples": 3}, tiny_clip, example_index, vlm)
    for p in photos:
        vlm.seen.clear()
        cropper.crop_batch([CropRequest(str(p), Task.FREE)])
        shown = set().union(*vlm.seen)
        others = {_uuid(str(q)) for q in photos if q != p}
        assert _uuid(str(p)) not in shown and shown & others, (p.name, len(shown))


class ScriptedVLM:
    """Test double: answers each round with the given texts, in order (a text in a 1-tuple: an
    answer the backend reports as cut at the token limit)."""

    id = "scripted"

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = 0
        self.params = []

    def generate(self, conversations, params):
        self.calls += 1
        self.params.append(params)
        text = self.answers.pop(0) if self.answers else "nothing useful"
        if isinstance(text, Exception):
            raise text
        cut = isinstance(text, tuple)
        text = text[0] if cut else text
        return [Generation([text] * params.n, 10, 5, truncated=[cut] * params.n) for _ in conversations]


def test_answers_cut_at_the_token_limit_are_never_parsed(photos, tiny_clip, example_index):
    """A box cut short ("(4.5, 123, 456, 789, 100" has five numbers) counts as no answer: retried,
    then the fallback, and the row says why; the limit follows the grammar when not configured."""
    cut = ("(4.5, 123, 456, 789, 100",)
    vlm = ScriptedVLM([cut, ("(4.5, 123, 456, 789, 1000)",)])  # even a complete-looking cut text
    cropper = make_cropper({}, tiny_clip, example_index, vlm)
    res = cropper.crop(CropRequest(photos[0], Task.FREE))[0]
    assert res.pipeline == "vlm-fallback" and vlm.calls == 2
    assert any("cut at the token limit" in n for n in res.notes), res.notes
    # no tokenizer known (this double has none): the longest answer's characters + the end token
    # the default list mode: R=3 boxes joined by ", "
    assert vlm.params[0].max_new_tokens == 1 + 3 * 30 + 2 * 2 + 1
    one = ScriptedVLM(["(4, 100, 100, 900, 900)"] * 3)
    make_cropper({"vlm.parallel": True}, tiny_clip, example_index, one).crop(CropRequest(photos[0], Task.FREE))
    assert one.params[0].max_new_tokens == len(" (4.99, 1000, 1000, 1000, 1000)") + 1  # one box a sample
    explicit = ScriptedVLM(["(4, 100, 100, 900, 900)"] * 3)
    make_cropper({"vlm.max_new_tokens": 40}, tiny_clip, example_index, explicit).crop(
        CropRequest(photos[0], Task.FREE))
    assert explicit.params[0].max_new_tokens == 40 * 3  # tokens per box, R boxes in one answer


def test_unusable_answers_retry_then_fallback(photos, tiny_clip, example_index):
    vlm = ScriptedVLM(["I refuse.", "Still no."])
    cropper = make_cropper({}, tiny_clip, example_index, vlm)
    res = cropper.crop(CropRequest(photos[0], Task.RATIO, ["4:3"]))[0]
    assert vlm.calls == 2  # round 0 and one retry, then no refinement for a fallback job
    assert res.pipeline == "vlm-fallback"
    assert any("no usable box" in n for n in res.notes)
    assert res.box.aspect == pytest.approx(4 / 3, rel=0.02)


def test_retry_succeeds_and_backend_errors_never_crash(photos, tiny_clip, example_index):
    vlm = ScriptedVLM([RuntimeError("CUDA out of memory"), "(4, 100, 100, 800, 800)",
                       "(4.5, 50, 50, 900, 900)", "garbage"])
    cropper = make_cropper({}, tiny_clip, example_index, vlm)
    res = cropper.crop(CropRequest(photos[1], Task.FREE))[0]
    assert res.pipeline == "vlm"
    assert any("CUDA out of memory" in n for n in res.notes)
    assert any("round 2: no usable box" in n for n in res.notes)
    assert {c.round for c in res.candidates} == {0, 1, 2}


def test_select_best_vs_final(photos, tiny_clip, example_index):
    answers = ["(4, 1, 1, 1000, 1000)", "(4, 400, 400, 450, 450)", "(4, 400, 400, 450, 450)"]
    final = make_cropper({"loop.select_free": "final"}, tiny_clip, example_index, ScriptedVLM(answers))
    best = make_cropper({"loop.select_free": "best"}, tiny_clip, example_index, ScriptedVLM(answers))
    r_final = final.crop(CropRequest(photos[0], Task.FREE))[0]
    r_best = best.crop(CropRequest(photos[0], Task.FREE))[0]
    assert r_final.extra["selected"]["round"] == 2
    assert r_best.score >= r_final.score
    assert r_best.score == max(c.score for c in r_best.candidates)


def test_no_vlm_pipeline_and_bad_request_isolated(photos, tiny_clip, example_index, tmp_path):
    cropper = make_cropper({}, tiny_clip, example_index, None)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    outs = cropper.crop_batch([CropRequest(photos[0], Task.RATIO, ["1:1"]), CropRequest(bad, Task.FREE),
                               CropRequest(photos[1], Task.SUBJECT, mask=np.ones((3, 3), bool))])
    assert outs[0][0].pipeline == "no-vlm" and outs[0][0].box.aspect == pytest.approx(1.0, abs=0.01)
    assert isinstance(outs[1], CropperError) and "broken.jpg" in str(outs[1])
    assert isinstance(outs[2], CropperError) and "mask" in str(outs[2])
    sources = {c.source for c in outs[0][0].candidates}
    assert "neighbour" in sources and "grid" in sources
