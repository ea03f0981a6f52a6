"""The registry models' property sheets (models/sheets/*.json), and the tiny models of
`cropper-engine models make-tiny DIR --like NAME` held against them: tokenizer behaviour on the
sample strings, special tokens and end ids, BOS handling, chat template rendering, tokens per image,
context, rope and sliding window. Each tiny builds in about a second."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from cropper_engine.models.registry import MODELS
from cropper_engine.models.sheets import (
    SAMPLE_CONVERSATION,
    SAMPLE_STRINGS,
    STRUCTURE_STRINGS,
    load_sheet,
    render_template,
    sheet_names,
)
from cropper_engine.models.tiny_vlm import LIKE_NAMES

PROVENANCE = ("verified", "facts", "unverified", "derived")


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    from cropper_engine.models.tiny_vlm import make_tiny_like

    out = tmp_path_factory.mktemp("like")
    return {name: make_tiny_like(out / name, name) for name in LIKE_NAMES}


@pytest.fixture(scope="module")
def processors(tinies):
    from transformers import AutoProcessor

    return {name: AutoProcessor.from_pretrained(path, local_files_only=True) for name, path in tinies.items()}


@pytest.fixture(params=LIKE_NAMES)
def name(request):
    return request.param


def _text_pieces(tok, ids: list[int]) -> list[str]:
    """Each token as the text it stands for ('▁' kept for SentencePiece pieces, as the sheets write
    them; byte-level tokens decoded, since a sheet writes the real model's tokens as text)."""
    pieces = tok.convert_ids_to_tokens(ids)
    if any("Ġ" in p or "Ċ" in p for p in pieces):
        return [tok.decode([i]) for i in ids]
    return pieces


# --- the sheets themselves ------------------------------------------------------------------------

def test_every_registry_model_has_a_sheet_and_tiny():
    assert sheet_names() == sorted(MODELS) == sorted(LIKE_NAMES)


def test_sheets_name_their_sources_and_provenance(name):
    sheet = load_sheet(name)
    assert sheet["name"] == name and sheet["hub_id"] == MODELS[name].hub_id
    assert sheet["family"] == MODELS[name].family
    assert sheet["sources"] and all(s["what"] and s["where"] for s in sheet["sources"])
    assert sheet["revision"]
    provenance = [sheet["config"]["provenance"], sheet["processor"]["provenance"],
                  sheet["tokens_per_image"]["provenance"], sheet["tokenizer"]["provenance"],
                  sheet["chat_template"]["provenance"]]
    words = re.findall(r"[a-z]+", repr(provenance))
    assert any(w in PROVENANCE for w in words)
    assert sheet["config"]["text"]["context"] == MODELS[name].context


def test_sheet_token_ids_are_consistent(name):
    """Recorded real ids: the box strings follow the sheet's digit rule, the rendered template's
    ids hold the special tokens at the sheet's ids, and the rendering is the sheet's template's."""
    sheet = load_sheet(name)
    sample = sheet["chat_template"]["sample"]
    assert sample["rendered"] == render_template(sheet["chat_template"]["template"], SAMPLE_CONVERSATION)
    if "samples" not in sheet:
        assert name == "smolvlm-instruct" and sample["ids"] is None  # no real tokenizer was available
        return
    strings = sheet["samples"]["strings"]
    assert set(strings) == set(SAMPLE_STRINGS)
    box = strings["(4.5, 123, 456, 789, 1000)"]
    assert len(box["ids"]) == len(box["pieces"])
    digits = [p.strip("▁ ") for p in box["pieces"] if p.strip("▁ ").isdigit()]
    if "groups" in sheet["tokenizer"]["digits"]:
        assert digits == ["4", "5", "123", "456", "789", "100", "0"]
    else:
        assert digits == list("451234567891000")
    specials = {tok: i for tok, i in sheet["special_tokens"].values()}
    for piece, i in zip(sample["pieces"], sample["ids"], strict=True):
        if piece in specials:
            assert i == specials[piece]
    assert sample["pieces"].count(sheet["special_tokens"]["image"][0]) == 2


def _sheet_ids(sheet: dict) -> dict[str, list[int]]:
    """Every token id a sheet records, by where it records it."""
    found: dict[str, list[int]] = {
        "config.image_token_id": [sheet["config"]["image_token_id"]],
        "special_tokens": [i for _, i in sheet["special_tokens"].values() if i is not None],
        "end_ids": list(sheet["end_ids"] or []),
        "added_tokens": [i for _, i in sheet["added_tokens"]["tokens"]],
        "chat_template.sample": list(sheet["chat_template"]["sample"]["ids"] or []),
    }
    for key in ("samples", "image_tags"):
        for s, v in ((sheet.get(key) or {}).get("strings") or {}).items():
            found[f"{key}[{s!r}]"] = list(v["ids"] or [])
    return found


def test_sheet_ids_are_within_the_vocabulary(name):
    """No recorded id at or past the vocabulary (SmolVLM's sheet had <image> 49190 with a vocab of
    49155); the tokens the model added sit at the end, in order, with the special tokens' ids."""
    sheet = load_sheet(name)
    vocab = sheet["config"]["text"]["vocab_size"]
    for where, ids in _sheet_ids(sheet).items():
        assert all(0 <= i < vocab for i in ids), (where, [i for i in ids if not 0 <= i < vocab], vocab)
    added = sheet["added_tokens"]
    base = added["base_vocab_size"]
    assert [i for _, i in added["tokens"]] == list(range(base, base + len(added["tokens"])))
    if added["tokens"]:  # the idefics families: the added tokens are the vocabulary's last ids
        assert base + len(added["tokens"]) == vocab
    specials = {t: i for t, i in sheet["special_tokens"].values()}
    for tok, i in added["tokens"]:
        assert specials.get(tok, i) == i, tok
    image, image_id = sheet["special_tokens"]["image"]
    assert image_id == sheet["config"]["image_token_id"]
    if sheet["family"] != "qwen2_5_vl":
        assert [image, image_id] in added["tokens"]


def test_sheet_idefics3_tokens_per_image_count_the_tag_pieces(name):
    """Unsplit: <fake_token_around_image> + <global-img> as the real tokenizer splits it + image_seq_len
    x <image> + <fake_token_around_image>; neither tag is an added token."""
    sheet = load_sheet(name)
    if sheet["family"] != "idefics3":
        pytest.skip("Idefics3 only")
    tags = sheet["image_tags"]["strings"]
    added = {t for t, _ in sheet["added_tokens"]["tokens"]}
    assert "<global-img>" not in added and not any(t.startswith("<row_") for t in added)
    global_img = tags["<global-img>"]["pieces"]
    assert len(global_img) > 1 and "".join(global_img) == "<global-img>"
    assert "".join(tags["<row_1_col_1>"]["pieces"]) == "<row_1_col_1>"
    n = 1 + len(global_img) + sheet["processor"]["hub"]["image_seq_len"] + 1
    assert sheet["tokens_per_image"]["no_splitting"] == sheet["tokens_per_image"]["engine"] == n
    assert n == {"idefics3-8b": 175, "smolvlm-instruct": 88}[name]


# --- the --like tiny models against the sheets -------------------------------------------------------

def test_tiny_tokenizes_boxes_and_numbers_as_the_real_model(name, processors):
    sheet = load_sheet(name)
    tok = processors[name].tokenizer
    strings = (sheet.get("samples") or {}).get("strings")
    for s in STRUCTURE_STRINGS:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        if strings is None:  # SmolVLM: no real ids here; FACTS.md's rule, one token per digit
            assert [p for p in _text_pieces(tok, ids) if p.strip().isdigit()] == [c for c in s if c.isdigit()]
            continue
        assert _text_pieces(tok, ids) == strings[s]["pieces"], s
        assert len(ids) == len(strings[s]["ids"]), s


def test_tiny_special_tokens_end_ids_and_bos(name, processors, tinies):
    import json

    sheet = load_sheet(name)
    tok = processors[name].tokenizer
    for text, _ in sheet["special_tokens"].values():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [text], text
    real_by_id = {i: t for t, i in sheet["special_tokens"].values() if i is not None}
    if sheet["end_ids"] is not None:  # the recorded ids name the recorded end tokens
        assert [real_by_id.get(i) for i in sheet["end_ids"]] == sheet["end_tokens"]
    gen = json.loads((tinies[name] / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert set(tok.convert_ids_to_tokens(eos)) == set(sheet["end_tokens"])
    with_bos = tok("Hi", add_special_tokens=True)["input_ids"]
    assert (with_bos[0] == tok.bos_token_id) == sheet["tokenizer_adds_bos"]
    if sheet["tokenizer_adds_bos"]:
        assert tok.bos_token == sheet["special_tokens"]["bos"][0]


def test_tiny_added_tokens_are_the_real_ones(name, processors, tinies):
    """The tiny's tokenizer adds exactly the real model's added tokens, in the real order, as its last
    ids (and the config's image token is one of them); any other added token of the tiny is one of
    its text tokenizer's own specials (<unk>, <s>, </s>, <|...|>), never an image tag."""
    import json

    sheet = load_sheet(name)
    tok = processors[name].tokenizer
    real = [t for t, _ in sheet["added_tokens"]["tokens"]]
    n = len(tok)
    assert tok.convert_ids_to_tokens(list(range(n - len(real), n))) == real
    own = [a.content for a in tok.added_tokens_decoder.values()]
    assert len(own) == len(set(own))
    assert {t for t in own if not re.fullmatch(r"<unk>|<s>|</s>|<\|[a-z0-9_]+\|>", t)} == set(real)
    config = json.loads((tinies[name] / "config.json").read_text())
    image_token = sheet["special_tokens"]["image"][0]
    assert tok.convert_ids_to_tokens(config["image_token_id"]) == image_token
    assert config["text_config"]["vocab_size"] == n


def test_tiny_image_tags_split_as_the_real_tokenizer(name, processors):
    """'<global-img>' and the tile tags are text to the real Idefics3 tokenizers: the tiny splits
    them into the real pieces (4 for Llama 3, 5 for SmolLM2), not one token."""
    sheet = load_sheet(name)
    if sheet["family"] != "idefics3":
        pytest.skip("Idefics3 only")
    tok = processors[name].tokenizer
    for tag, real in sheet["image_tags"]["strings"].items():
        ids = tok(tag, add_special_tokens=False)["input_ids"]
        if real["pieces"] is not None:
            assert [tok.decode([i]) for i in ids] == real["pieces"], tag
    for i in range(6):
        for j in range(6):
            tag = f"<row_{i + 1}_col_{j + 1}>"
            pieces = [tok.decode([k]) for k in tok(tag, add_special_tokens=False)["input_ids"]]
            assert len(pieces) == len(sheet["image_tags"]["strings"]["<row_1_col_1>"]["pieces"]), tag
            assert "".join(pieces) == tag


def test_tiny_chat_template_renders_as_the_real_one(name, processors):
    sheet = load_sheet(name)
    proc = processors[name]
    rendered = proc.apply_chat_template(SAMPLE_CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered == sheet["chat_template"]["sample"]["rendered"]
    real_ids = sheet["chat_template"]["sample"]["ids"]
    if real_ids is None:
        return
    # the same special tokens in the same order, and the same number of tokens in every box run
    tok = proc.tokenizer
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    specials = {t for t, _ in sheet["special_tokens"].values()}
    ours = [p for p in tok.convert_ids_to_tokens(ids) if p in specials]
    theirs = [p for p in sheet["chat_template"]["sample"]["pieces"] if p in specials]
    assert ours == theirs
    run = "\n(4.5, 123, 456, 789, 1000), (0.73, 1, 20, 300, 999)\n"
    image = sheet["special_tokens"]["image"][0]
    real_run = sheet["chat_template"]["sample"]["pieces"]
    start = real_run.index(image) + 1
    end = start + real_run[start:].index(image)
    tiny_pieces = _text_pieces(tok, ids)
    t_start = tiny_pieces.index(image) + 1
    t_end = t_start + tiny_pieces[t_start:].index(image)
    assert tiny_pieces[t_start:t_end] == real_run[start:end], run


def _count_image_tokens(proc, image: Image.Image, image_token: str) -> int:
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                                    add_generation_prompt=True, tokenize=False)
    ids = proc(text=[text], images=[[image]] if not hasattr(proc, "video_processor") else [image],
               return_tensors="pt")["input_ids"][0].tolist()
    without = proc.tokenizer(text.replace(image_token, ""))["input_ids"]  # BOS as the processor adds it
    return len(ids) - len(without)


def test_tiny_tokens_per_image_as_the_real_model(name, processors):
    sheet = load_sheet(name)
    proc = processors[name]
    photo = Image.new("RGB", (1024, 768), (120, 80, 40))
    if sheet["family"] == "qwen2_5_vl":
        # one token per 28 x 28 px after rounding to multiples of 28: 768 -> 756 (27), 1024 -> 1036 (37)
        grid = proc.image_processor([photo], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert grid == [1, 27 * 2, 37 * 2]
        size = proc.image_processor.size
        assert (size["shortest_edge"], size["longest_edge"]) == (sheet["processor"]["hub"]["min_pixels"],
                                                                 sheet["processor"]["hub"]["max_pixels"])
        return
    ip = proc.image_processor
    hub = sheet["processor"]["hub"]
    assert ip.do_image_splitting is hub["do_image_splitting"] and proc.image_seq_len == hub["image_seq_len"]
    ip.do_image_splitting = False
    try:
        assert _count_image_tokens(proc, photo, "<image>") == sheet["tokens_per_image"]["no_splitting"]
    finally:
        ip.do_image_splitting = hub["do_image_splitting"]
    if sheet["family"] == "idefics2" and hub["do_image_splitting"]:
        assert _count_image_tokens(proc, photo, "<image>") == sheet["tokens_per_image"]["hub_defaults"] == 326
    if sheet["family"] == "idefics3":  # the hub's tiles: longest edge 4 x the tile, 4 x 3 tiles + global
        assert ip.size["longest_edge"] == hub["size"]["longest_edge"] == 4 * hub["max_image_size"]["longest_edge"]
        n = _count_image_tokens(proc, photo, "<image>")
        assert n >= 13 * hub["image_seq_len"]
        if sheet["tokens_per_image"]["hub_defaults_1024x768"] is not None:  # tags and newlines as the real ones
            assert n == sheet["tokens_per_image"]["hub_defaults_1024x768"]


def test_tokens_per_image_at_the_engine_settings(name, tinies):
    """The engine's per-model processor settings on the tiny's processor (the hub's processor
    config): the measured tokens per image are the sheet's, and the registry's."""
    from transformers import AutoProcessor

    from cropper_engine.models.images import apply_processor_settings, measure_image_tokens

    proc = AutoProcessor.from_pretrained(tinies[name], local_files_only=True)
    apply_processor_settings(proc, MODELS[name].processor_settings)
    assert measure_image_tokens(proc) == load_sheet(name)["tokens_per_image"]["engine"]


def test_tiny_config_keeps_context_rope_and_window(name, tinies, processors):
    import json

    sheet = load_sheet(name)
    real = sheet["config"]["text"]
    config = json.loads((tinies[name] / "config.json").read_text())
    text = config["text_config"]
    assert processors[name].tokenizer.model_max_length == real["context"]
    if sheet["family"] == "qwen2_5_vl":  # a window size in its config, but off
        assert real["sliding_window"] is None and text.get("use_sliding_window") is False
    else:
        assert text.get("sliding_window") == real["sliding_window"]
    rope = text["rope_parameters"]
    assert rope["rope_theta"] == real["rope"]["rope_theta"] and rope["rope_type"] == real["rope"]["rope_type"]
    if sheet["family"] == "idefics2":
        assert text["sliding_window"] == 4096  # kept real: the default prompts (~6-7k tokens) cross it
        assert config["perceiver_config"]["resampler_n_latents"] == 64
    elif sheet["family"] == "idefics3":
        assert config["scale_factor"] == sheet["config"]["connector"]["scale_factor"]
        assert config["vision_config"]["image_size"] == sheet["config"]["vision"]["image_size"]
        assert config["vision_config"]["patch_size"] == sheet["config"]["vision"]["patch_size"]
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            assert rope.get(k) == real["rope"].get(k), k
    else:
        real_sections = real["rope"]["mrope_section"]
        assert [s * sum(real_sections) for s in rope["mrope_section"]] == \
            [s * sum(rope["mrope_section"]) for s in real_sections]  # the same proportions
        vision = config["vision_config"]
        for k in ("patch_size", "spatial_merge_size", "window_size", "temporal_patch_size"):
            assert vision[k] == sheet["config"]["vision"][k], k


def test_make_tiny_like_cli(tmp_path):
    from click.testing import CliRunner

    from cropper_engine.cli import main

    res = CliRunner().invoke(main, ["models", "make-tiny", str(tmp_path), "--like", "qwen2.5-vl-7b"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "qwen2.5-vl-7b" / "config.json").is_file() and "qwen2.5-vl-7b" in res.output
    res = CliRunner().invoke(main, ["models", "make-tiny", str(tmp_path), "--like", "llava"])
    assert res.exit_code == 2 and "mantis-8b-idefics2" in res.output and "Traceback" not in res.output
