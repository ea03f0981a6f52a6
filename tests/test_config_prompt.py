"""Config precedence and validation; prompt layout and templates."""

import pytest
from PIL import Image

from cropper_engine.config import load_config
from cropper_engine.engine.prompt import PromptExample, PromptSpec, build_messages, load_templates
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


def _spec(task=Task.FREE, ratio=None, n_examples=2):
    img = Image.new("RGB", (64, 48))
    exs = [PromptExample(img, 640, 480, [(Box(0, 0, 320, 240), 4.5), (Box(64, 48, 640, 480), None)], f"u{i}")
           for i in range(n_examples)]
    return PromptSpec(task, img, 800, 600, exs, 1, ratio, (500, 400) if task is Task.SUBJECT else None)


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
    # the example's boxes in 1..1000: (0,0,320,240) of 640x480 -> (1, 1, 500, 500)
    assert "(4.5, 1, 1, 500, 500), (5, 101, 101, 1000, 1000)" in first[2]
    refined = build_messages(spec, load_templates(None), [(Box(0, 0, 400, 300), 0.71234, 4.0)])[0].content
    # everything of round 0 but its last text is a prefix of the refinement prompt
    assert refined[: len(first) - 1] == first[:-1]
    assert refined[len(first) - 1].startswith(first[-1])
    assert "(4, 1, 1, 500, 500), Score is 0.712" in refined[-1]
    assert refined[-1].rstrip().endswith("(s, x1, y1, x2, y2).")
    crop = [p for p in refined if isinstance(p, ImagePart)][-1]
    assert crop.box == (0, 0, 400, 300) and crop.pil().size == (400, 300) and crop.size == (400, 300)


def test_prompt_tasks_and_zero_shot():
    ratio = build_messages(_spec(Task.RATIO, Ratio(16, 9)), load_templates(None))[0].content
    assert "Aspect ratio 16:9" in ratio[-1]
    subj = build_messages(_spec(Task.SUBJECT), load_templates(None))[0].content
    assert "Subject centre (500, 400)" in subj[-1]
    zero = build_messages(_spec(n_examples=0), load_templates(None))[0].content
    assert len([p for p in zero if isinstance(p, ImagePart)]) == 1 and "No example images" in zero[0]


def test_template_override(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('query_free = "\\nCrop this one: {n} box(es).\\n"\n')
    tpl = load_templates(f)
    msg = build_messages(_spec(), tpl)[0].content
    assert msg[-1] == "\nCrop this one: 1 box(es).\n"
    f.write_text('query_fre = "x"\n')
    with pytest.raises(ConfigError, match="unknown prompt template keys"):
        load_templates(f)
    f.write_text('query_free = "{nope}"\n')
    with pytest.raises(ConfigError, match="bad placeholder"):
        build_messages(_spec(), load_templates(f))
