"""Config precedence and validation; prompt layout and templates."""

import pytest
from PIL import Image

from cropper_engine.config import load_config
from cropper_engine.engine.prompt import PromptExample, PromptSpec, build_messages, load_templates, render_text
from cropper_engine.errors import ConfigError
from cropper_engine.models.base import ImagePart
from cropper_engine.types import Box, Ratio, Task


def test_precedence_defaults_file_env_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('index = "from-file"\n[vlm]\ncandidates = 4\nrounds = 1\n')
    cfg = load_config(f, env={})
    assert cfg.index == "from-file" and cfg.vlm.candidates == 4 and cfg.vlm.rounds == 1
    cfg = load_config(f, env={"CROPPER_VLM_CANDIDATES": "3", "CROPPER_INDEX": "from-env"})
    assert cfg.vlm.candidates == 3 and cfg.index == "from-env" and cfg.vlm.rounds == 1
    cfg = load_config(f, env={"CROPPER_VLM_CANDIDATES": "3"}, overrides={"vlm.candidates": 2, "vlm.rounds": None})
    assert cfg.vlm.candidates == 2 and cfg.vlm.rounds == 1  # None = flag not given
    assert load_config(env={}).retrieval.examples == 30  # the paper's S


def test_bad_config_values_named(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[vlm]\ncandidatez = 4\n")
    with pytest.raises(ConfigError, match=r"candidatez.*valid keys"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="not a valid int"):
        load_config(env={"CROPPER_VLM_CANDIDATES": "six"})
    with pytest.raises(ConfigError, match="must be positive"):
        load_config(env={}, overrides={"vlm.candidates": 0})
    with pytest.raises(ConfigError, match=r"final.*best"):
        load_config(env={}, overrides={"loop.select_free": "worst"})
    f.write_text("[vlm\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})


def _spec(task=Task.FREE, ratio=None, n_examples=2, n_boxes=1):
    img = Image.new("RGB", (64, 48))
    subjects = [Box(64, 48, 320, 240), Box(64, 48, 320, 240)] if task is Task.SUBJECT else None
    exs = [PromptExample(img, 640, 480, [(Box(0, 0, 320, 240), 4.5), (Box(64, 48, 640, 480), None)], f"u{i}",
                         subjects, f"/data/ex{i}.jpg")
           for i in range(n_examples)]
    return PromptSpec(task, img, 800, 600, exs, n_boxes, ratio,
                      Box(80, 60, 400, 300) if task is Task.SUBJECT else None, query_name="/photos/q.jpg")


def test_prompt_layout_and_shared_prefix():
    spec = _spec()
    first = build_messages(spec, load_templates(None))[0].content
    assert isinstance(first[0], str) and first[0].startswith("Localize the aesthetic part")
    imgs = [p for p in first if isinstance(p, ImagePart)]
    assert len(imgs) == 3 and [p.uuid for p in imgs[:2]] == ["u0", "u1"]
    # text after an image starts with a newline (token parity with vLLM)
    for i, p in enumerate(first[:-1]):
        if isinstance(p, ImagePart):
            assert first[i + 1].startswith("\n")
    # the example's boxes in 1..1000: (0,0,320,240) of 640x480 -> (1, 1, 500, 500); the unscored
    # crop shows the documented constant, and the instruction says so
    assert "(4.5, 1, 1, 500, 500), (5, 101, 101, 1000, 1000)" in first[2]
    assert "without MOS are shown with s = 5" in first[0]
    assert first[-1] == "\nQuery image. Answer with one region as (s, x1, y1, x2, y2).\n"
    refined = build_messages(spec, load_templates(None), [(Box(0, 0, 400, 300), 0.71234, 4.0)])[0].content
    # everything of round 0 up to the query line is a prefix of the refinement prompt; round 0's
    # request is not repeated there
    assert refined[: len(first) - 1] == first[:-1]
    assert refined[len(first) - 1].startswith("\nQuery image.\n") and first[-1].startswith("\nQuery image. ")
    assert "Answer with" not in refined[len(first) - 1]
    # the box as scored and its score, on the MOS scale (0.71234 -> 1 + 4 x 0.71234 = 3.85): the
    # model's own s (4.0) for a box it proposed is not shown beside another box
    assert "(3.85, 1, 1, 500, 500), Score is 3.85" in refined[-1]
    # one box asked for: the paper's words
    assert refined[-1].rstrip().endswith("Propose similar crop that has high score. The region should be "
                                         "represented by (s, x1, y1, x2, y2).")
    crop = [p for p in refined if isinstance(p, ImagePart)][-1]
    assert crop.box == (0, 0, 400, 300) and crop.pil().size == (400, 300) and crop.size == (400, 300)


def test_list_mode_asks_for_r_boxes_every_round():
    spec = _spec(n_boxes=6)
    first = build_messages(spec, load_templates(None))[0].content
    assert "Answer with 6 different regions, each as (s, x1, y1, x2, y2), separated by commas." in first[-1]
    refined = build_messages(spec, load_templates(None), [(Box(0, 0, 400, 300), 0.7, None)])[0].content
    assert "Propose 6 different similar crops that have high scores." in refined[-1]


def test_prompt_labels_are_true_of_each_example():
    # ratio task: the target ratio said once (the query line), each example crop with its own ratio
    conv = build_messages(_spec(Task.RATIO, Ratio(16, 9)), load_templates(None))
    text = render_text(conv)
    assert "16:9" not in text and "Query image. Aspect ratio 1.78." in conv[0].content[-1]  # one notation
    # (0,0,320,240) is 4:3 -> 1.33; (64,48,640,480) is 576x432 -> 1.33 as well; both shown per crop
    assert "(4.5, 1, 1, 500, 500) aspect ratio 1.33, (5, 101, 101, 1000, 1000) aspect ratio 1.33" in text
    # subject task: the query's subject box and each example crop's subject box, in 1..1000
    subj = build_messages(_spec(Task.SUBJECT), load_templates(None))[0].content
    assert "Subject (101, 101, 500, 500)" in subj[-1]  # (80, 60, 400, 300) of 800x600
    assert "Subject (101, 101, 500, 500): (4.5, 1, 1, 500, 500), (5, 101, 101, 1000, 1000)" in subj[2]
    assert "centre" not in render_text([build_messages(_spec(Task.SUBJECT), load_templates(None))[0]])
    zero = build_messages(_spec(n_examples=0), load_templates(None))[0].content
    assert len([p for p in zero if isinstance(p, ImagePart)]) == 1 and "several images" not in zero[0]


def test_saved_prompt_text_names_every_image_where_it_stands():
    conv = build_messages(_spec(Task.RATIO, Ratio(4, 3)), load_templates(None), [(Box(0, 0, 400, 300), 0.5, 4.0)])
    text = render_text(conv)
    marks = [line for line in text.split("<image: ")[1:]]
    assert [m.split(">")[0] for m in marks] == ["example 1: /data/ex0.jpg", "example 2: /data/ex1.jpg",
                                                "query: /photos/q.jpg",
                                                "candidate 1: the query cropped to [0, 0, 400, 300] px"]
    # every text part is there verbatim, in order
    assert "".join(p for p in conv[0].content if isinstance(p, str)) == \
        "".join(part.split(">", 1)[-1] if i else part for i, part in enumerate(text.split("<image: ")))


def test_template_override(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('query_free = "\\nCrop this one:"\nask_free = " {n} box(es).\\n"\n')
    tpl = load_templates(f)
    msg = build_messages(_spec(), tpl)[0].content
    assert msg[-1] == "\nCrop this one: 1 box(es).\n"
    f.write_text('query_fre = "x"\n')
    with pytest.raises(ConfigError, match="unknown prompt template keys"):
        load_templates(f)
    f.write_text('query_free = "{nope}"\n')
    with pytest.raises(ConfigError, match="bad placeholder"):
        build_messages(_spec(), load_templates(f))
