"""The loop as the paper has it: R distinct candidates per round, truthful example labels, T
crops for every task, and the prompts a user can read (`crop --save-prompts`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cropper_engine.cli import main
from cropper_engine.config import load_config
from cropper_engine.engine.loop import Cropper
from cropper_engine.engine.prompt import render_text
from cropper_engine.models.base import Generation
from cropper_engine.types import CropRequest, Task


class TrainedModelDouble:
    """Test double for a trained VLM at the loop's low temperature: asked for one box per answer
    with n samples, its samples nearly agree (a pixel or two apart); asked for R boxes in one
    answer, it lists R different alternatives. It records what it was asked."""

    id = "trained-model-double"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (n samples, boxes per answer)
        self.texts: list[str] = []
        self.rendered: list[str] = []  # with each image named where it stands

    def generate(self, conversations, params):
        boxes = params.grammar.boxes if params.grammar is not None else 1
        self.calls.append((params.n, boxes))
        out = []
        for conv in conversations:
            self.texts.append("".join(p for m in conv for p in m.content if isinstance(p, str)))
            self.rendered.append(render_text(conv))
            shift = 10 * len(self.calls)  # each round proposes somewhat new crops
            if boxes == 1:  # n samples of one box: near-identical
                texts = [f"(4.{k % 10}, {100 + shift + k % 2}, 120, {800 + shift}, 880)" for k in range(params.n)]
            else:  # one list of `boxes` alternatives
                texts = [", ".join(f"(4.5, {40 + 60 * k + shift}, {30 + 40 * k}, {560 + 60 * k + shift}, "
                                   f"{640 + 40 * k})" for k in range(boxes))]
            out.append(Generation(texts, 100, 30 * boxes))
        return out


def _cropper(cfg_over, tiny_clip, example_index, vlm):
    from cropper_engine.index.store import ExampleIndex

    cfg = load_config(env={}, overrides={"retrieval.examples": 3, "vlm.candidates": 4, "vlm.rounds": 2,
                                         "loop.keep_faces": "off", **cfg_over})
    idx = ExampleIndex.load(example_index, embedder=tiny_clip)
    return Cropper.from_config(cfg, embedder=tiny_clip, index=idx, vlm=vlm)


def test_round_zero_lists_r_boxes_and_every_round_gives_r_distinct(photos, tiny_clip, example_index):
    vlm = TrainedModelDouble()
    res = _cropper({}, tiny_clip, example_index, vlm).crop(CropRequest(photos[0], Task.FREE))[0]
    assert res.pipeline == "vlm", res.notes
    assert vlm.calls == [(1, 4)] * 3  # the default: one answer of R boxes, in round 0 and both refinements
    assert "Answer with 4 different regions" in vlm.texts[0]
    assert "Propose 4 different similar crops" in vlm.texts[1]
    assert res.extra["distinct_by_round"] == [{"round": r, "boxes": 4, "distinct": 4} for r in range(3)]
    assert [len(res.extra["distinct_by_round"])] == [len({c.round for c in res.candidates})]
    row = res.to_json()
    assert row["distinct_by_round"][0]["distinct"] == 4  # in the results.jsonl row


def test_parallel_samples_of_a_trained_model_collapse(photos, tiny_clip, example_index):
    """Why the list is the default: R one-box samples of a trained model dedupe to one."""
    vlm = TrainedModelDouble()
    res = _cropper({"vlm.parallel": True}, tiny_clip, example_index, vlm).crop(CropRequest(photos[0], Task.FREE))[0]
    assert vlm.calls == [(4, 1)] * 3
    assert "Answer with one region" in vlm.texts[0]
    assert "Propose similar crop that has high score." in vlm.texts[1]  # the paper's words
    assert res.extra["distinct_by_round"] == [{"round": r, "boxes": 4, "distinct": 1} for r in range(3)]


def test_subject_task_shows_subject_boxes_and_t_crops(photos, tiny_clip, example_index):
    class Recording(TrainedModelDouble):
        def generate(self, conversations, params):
            self.convs = conversations
            return super().generate(conversations, params)

    vlm = Recording()
    img = Image.open(photos[2])
    w, h = img.size
    mask = np.zeros((h, w), bool)
    mask[h // 4: h // 2, w // 5: w // 2] = True
    res = _cropper({"vlm.rounds": 0}, tiny_clip, example_index, vlm).crop(
        CropRequest(photos[2], Task.SUBJECT, mask=mask))[0]
    text = vlm.texts[0]
    x1, y1, x2, y2 = res.extra["subject_box"]
    assert (x1, y1, x2, y2) == (w // 5, h // 4, w // 2, h // 2)
    from cropper_engine.types import Box

    want = ", ".join(map(str, Box(x1, y1, x2, y2).to_norm(w, h)))
    assert f"Query image. Subject ({want})." in text
    assert "centre" not in text and "(500, 500)" not in text
    # each example: its subject box (the fixture's mask_box, 0.4..0.6 of the image), then all its
    # 3 crops (T=5 >= 3), for the subject task as for the others
    groups = re.findall(r"Subject \((\d+), (\d+), (\d+), (\d+)\): ((?:\([^)]*\)(?:, )?)+)", text)
    assert len(groups) == 3
    for g in groups:
        assert all(abs(int(v) - want_v) <= 2 for v, want_v in zip(g[:4], (401, 401, 600, 600), strict=True))
        assert g[4].count("(") == 3


def test_subject_task_shows_every_example_even_from_an_index_without_subject_boxes(photos, tiny_clip, tmp_path):
    """An index built without subject boxes (`--subjects none`, or before they were stored): the
    subject task still shows S examples, each with the subject boxes found at query time (the
    same automatic subject `index build` stores), never a silent zero-shot prompt."""
    from cropper_engine.data.example import Example
    from cropper_engine.index.store import ExampleIndex
    from cropper_engine.types import Box

    exs = []
    for i, p in enumerate(photos):
        w, h = Image.open(p).size
        exs.append(Example(p.name, str(p), w, h, [Box(0, 0, w, h), Box(0, 0, w / 2, h)], None, None,
                           Box(0, 0, w / 2, h / 2) if i % 2 else None))
    ExampleIndex.build(exs, tiny_clip, tmp_path / "idx", subjects="none")
    vlm = TrainedModelDouble()
    w, h = Image.open(photos[0]).size
    mask = np.zeros((h, w), bool)
    mask[10:50, 10:50] = True
    cfg = {"vlm.rounds": 0, "retrieval.examples": 3}
    res = _cropper(cfg, tiny_clip, tmp_path / "idx", vlm).crop(CropRequest(photos[0], Task.SUBJECT, mask=mask))[0]
    text = vlm.rendered[0]
    assert text.count("<image: ") == 4 and "several images" in text  # S=3 examples and the query
    examples = text.split("<image: ")[1:-1]
    assert all("Subject (" in ex for ex in examples), text
    assert any("found at query time" in n for n in res.notes) and not any("zero-shot" in n for n in res.notes)


def test_subject_task_with_no_example_is_a_coherent_zero_shot_prompt(photos, tiny_clip, example_index):
    vlm = TrainedModelDouble()
    w, h = Image.open(photos[0]).size
    mask = np.zeros((h, w), bool)
    mask[10:50, 10:50] = True
    res = _cropper({"vlm.rounds": 0, "retrieval.examples": 0}, tiny_clip, example_index, vlm).crop(
        CropRequest(photos[0], Task.SUBJECT, mask=mask))[0]
    text = vlm.rendered[0]
    assert text.count("<image: ") == 1 and "several images" not in text and "No example" not in text
    assert any(n.startswith("zero-shot: the VLM was shown no examples (S=0)") for n in res.notes), res.notes


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert (res.exit_code == 0) == ok, res.output
    return res


@pytest.fixture(scope="module")
def masked_index(tmp_path_factory, photos, tiny_dir):
    """An index built by the CLI from a JSONL set whose examples have mask files (no mask_box)
    and crops of several aspect ratios."""
    d = tmp_path_factory.mktemp("masked")
    with (d / "set.jsonl").open("w") as fh:
        for i, p in enumerate(photos):
            w, h = Image.open(p).size
            m = np.zeros((h, w), np.uint8)
            m[h // 3: 2 * h // 3, w // 4: w // 2 + 10 * i] = 255
            Image.fromarray(m).save(d / f"m{i}.png")
            crops = [[0, 0, w // 2, h // 2], [w // 8, 0, w, h], [0, h // 4, w // 3 + 7 * i, h]]
            fh.write(json.dumps({"image": str(p), "crops": crops, "scores": [4.0, 3.5, 3.0],
                                 "mask": str(d / f"m{i}.png")}) + "\n")
    emb = f"open_clip-dir:{tiny_dir / 'clip' / 'open_clip'}"
    run("index", "build", "--dataset", "jsonl", "--annotations", d / "set.jsonl", "--out", d / "idx",
        "--embedder", emb)
    return d / "idx"


def test_index_build_derives_the_subject_box_from_the_mask(masked_index, photos):
    rows = [json.loads(ln) for ln in (masked_index / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        w, h = row["width"], row["height"]
        assert row["mask_box"] == [w // 4, h // 3, w // 2 + 10 * i, 2 * h // 3]
        assert row["extra"]["mask_box_from"] == "mask"


def test_crop_save_prompts_with_the_tiny_model(photos, tiny_dir, masked_index, tmp_path):
    """The issue's acceptance: the tiny model, an index with images, `crop --save-prompts`."""
    out = tmp_path / "out"
    vlm = ["--vlm", tiny_dir / "idefics2", "--backend", "transformers", "--index", masked_index,
           "-S", "3", "-R", "3", "-L", "1", "--no-keep-faces"]
    run("crop", photos[0], "--ratio", "4:3", *vlm, "--out", out, "--save-prompts", "--report")
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["pipeline"] == "vlm", row.get("notes")
    assert [d["round"] for d in row["distinct_by_round"]] == [0, 1]
    assert all(0 <= d["distinct"] <= d["boxes"] <= 3 for d in row["distinct_by_round"])
    files = row["prompts"]
    assert files[0].startswith("prompts/") and files[0].endswith("round0.txt")
    text = (out / files[0]).read_text()
    prompt = text.split("===== prompt =====\n", 1)[1].split("\n===== answer 1 (raw) =====\n")[0]
    assert "===== answer 1 (raw) =====" in text
    # round 0 asks for R boxes in one answer; the target ratio is said once, in the query line
    assert "Answer with 3 different regions" in prompt
    assert "4:3" not in prompt and "Query image. Aspect ratio 1.33." in prompt  # one notation: width / height
    # each example's crops with their own aspect ratio (width / height in pixels)
    lines = (masked_index / "metadata.jsonl").read_text().splitlines()
    meta = {json.loads(ln)["image"]: json.loads(ln) for ln in lines}
    blocks = re.split(r"<image: ", prompt)[1:]
    examples = [b for b in blocks if b.startswith("example ")]
    assert len(examples) == 3
    for b in examples:
        path = b.split(">", 1)[0].split(": ", 1)[1]
        ex = meta[path]
        own = sorted(f"{(c[2] - c[0]) / (c[3] - c[1]):.2f}" for c in ex["crops"])
        shown = sorted(re.findall(r"aspect ratio (\d+\.\d\d)", b))
        assert shown == own, (path, shown, own)
    assert f"<image: query: {photos[0]}>" in prompt
    assert (out / files[1]).name == "round1.txt" and "<image: candidate 1: the query cropped to" in (
        out / files[1]).read_text()
    html = (out / "report" / "index.html").read_text()
    assert f'href="../{files[0]}"' in html

    # the subject task: the query's subject box, from its mask the same way as the examples'
    w, h = Image.open(photos[1]).size
    m = np.zeros((h, w), np.uint8)
    m[h // 5: h // 2, w // 3: 3 * w // 4] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    out2 = tmp_path / "out2"
    run("crop", photos[1], "--mask", tmp_path / "mask.png", *vlm, "--out", out2, "--save-prompts")
    row = json.loads((out2 / "results.jsonl").read_text().splitlines()[0])
    text = (out2 / row["prompts"][0]).read_text()
    from cropper_engine.types import Box

    want = ", ".join(map(str, Box(w // 3, h // 5, 3 * w // 4, h // 2).to_norm(w, h)))
    assert f"Query image. Subject ({want})." in text
    assert text.count("Subject (") == 4  # three examples (subject boxes from their masks) and the query
    assert Path(out2 / row["prompts"][0]).parent.name == Path(row["output"]).stem


def test_save_prompts_needs_out_and_says_when_there_is_no_vlm(photos, tmp_path):
    res = run("crop", photos[0], "--save-prompts", ok=False)
    assert "--save-prompts needs --out DIR" in res.output and "Traceback" not in res.output
    res = run("crop", photos[0], "--vlm", "none", "--out", tmp_path / "o", "--save-prompts")
    assert "no VLM in this run" in res.output and not (tmp_path / "o" / "prompts").exists()
