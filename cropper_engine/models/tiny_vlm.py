"""A tiny random Idefics2 (the Mantis-8B-Idefics2 architecture) built offline for tests and benchmarks.

`make_tiny_idefics2(out_dir)` writes a folder that `AutoProcessor.from_pretrained` and
`AutoModelForImageTextToText.from_pretrained` load like the real model: SigLIP-style vision tower,
perceiver resampler (8 latents, so 8 `<image>` tokens per image), Mistral text model, a ~1000-token
BPE tokenizer with SentencePiece-style '▁' spaces, an Idefics2 image processor without splitting, and
the Idefics2 / Mantis chat template. Random weights, seeded: the same seed gives the same files.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# The chat template of HuggingFaceM4/idefics2-8b (Mantis-8B-Idefics2 uses the same format):
# "User:<image>text<end_of_utterance>\nAssistant:"; a message that starts with text gets "Role: ".
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
VOCAB_SIZE = 1000
IMAGE_SEQ_LEN = 8  # perceiver latents = <image> tokens per image
IMAGE_SIZE = 112
PATCH_SIZE = 14

_SENTENCES = [
    "Localize the aesthetic part of the image.",
    "(s, x1, y1, x2, y2) represents the region.",
    "x1 and x2 are the left and right most positions, normalized into 1 to 1000,",
    "where 1 is the left and 1000 is the right.",
    "y1 and y2 are the top and bottom positions, normalized into 1 to 1000,",
    "where 1 is the top and 1000 is the bottom. s is MOS score.",
    "We provide several images here.",
    "Propose similar crop that has high score.",
    "The region should be represented by (s, x1, y1, x2, y2).",
    "Score is 0.5. The crop keeps the subject and the horizon.",
    "User: Assistant: a photo of a dog on the beach at sunset with people walking.",
    "The aspect ratio of the crop is 4:3, 16:9, 3:2 or 1:1.",
]


def _corpus(rng: random.Random) -> list[str]:
    lines = list(_SENTENCES) * 4
    for _ in range(400):
        box = (f"({rng.randint(0, 9)}.{rng.randint(0, 99)}, {rng.randint(1, 1000)}, {rng.randint(1, 1000)}, "
               f"{rng.randint(1, 1000)}, {rng.randint(1, 1000)})")
        lines.append(box + ", " + box)
    lines.append(" ".join(str(i) for i in range(1001)))
    lines.append("0 1 2 3 4 5 6 7 8 9 . , ( ) 0.73 4.5 1000")
    return lines


def _train_tokenizer(seed: int, vocab_size: int = VOCAB_SIZE, individual_digits: bool = False):
    """A Mistral-like BPE: '▁' spaces, byte fallback (`<0x0A>` for a newline), digits merged by BPE
    (or one token per digit, as Mistral's own tokenizer, with `individual_digits`). A vocabulary
    larger than the corpus supports is padded with filler tokens no text produces."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_bytes = 256

    def pre() -> Any:
        meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        return pre_tokenizers.Sequence([meta, pre_tokenizers.Digits(individual_digits=True)]) \
            if individual_digits else meta

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    if individual_digits:
        trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
            [trainer_tok.pre_tokenizer, pre_tokenizers.Digits(individual_digits=True)])
    alphabet = [chr(c) for c in range(32, 127)]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, VOCAB_SIZE) - n_bytes, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, min_frequency=1, show_progress=False)
    trainer_tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]

    # Specials first, then the 256 byte tokens, then what BPE learned (as in Llama / Mistral).
    learned = sorted((i, t) for t, i in model["vocab"].items() if t not in SPECIAL_TOKENS)
    tokens = SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(n_bytes)] + [t for _, t in learned]
    tokens += [f"▁<filler{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.pre_tokenizer = pre()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


# The shape of Idefics2-8B / Mantis-8B-Idefics2 (their published config.json), for timing the
# real architecture with random weights (bench/fullsize.py); "tiny" is the test model.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": VOCAB_SIZE, "image_size": IMAGE_SIZE, "longest_edge": IMAGE_SIZE, "shortest_edge": 3 * PATCH_SIZE,
        "image_seq_len": IMAGE_SEQ_LEN, "individual_digits": False,
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        "perceiver": dict(hidden_size=256, rms_norm_eps=1e-5, resampler_n_latents=IMAGE_SEQ_LEN,
                          resampler_depth=1, resampler_n_heads=4, resampler_head_dim=32, num_key_value_heads=2),
        "text": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, sliding_window=None),
    },
    "8b": {
        "vocab_size": 32003, "image_size": 980, "longest_edge": 980, "shortest_edge": 378, "image_seq_len": 64,
        "individual_digits": True,
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=980, patch_size=14),
        "perceiver": dict(hidden_size=4096, rms_norm_eps=1e-5, resampler_n_latents=64, resampler_depth=3,
                          resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4),
        "text": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, sliding_window=4096,
                     rope_theta=10000.0),
    },
}


def make_tiny_idefics2(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny random model, processor and generation config in `out_dir`; return it."""
    return build_idefics2(out_dir, "tiny", seed=seed)[0]


def build_idefics2(out_dir: str | Path, shape: str = "tiny", *, seed: int = 0, save_weights: bool = True,
                   device: str = "cpu", dtype: Any = None) -> tuple[Path, Any]:
    """An Idefics2 of the given shape with random weights: processor, tokenizer and config written
    to `out_dir`; the weights too when `save_weights` (else the model is only returned, built
    on `device`, which is how an 8B model is timed without writing 16 GB)."""
    import torch
    from transformers import (
        GenerationConfig,
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
        PreTrainedTokenizerFast,
    )

    spec = SHAPES[shape]
    vocab_size = spec["vocab_size"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(seed, vocab_size, spec["individual_digits"]),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        extra_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=spec["text"]["max_position_embeddings"],
        padding_side="left",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=False, size={"shortest_edge": spec["shortest_edge"], "longest_edge": spec["longest_edge"]}
    )
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=spec["image_seq_len"], chat_template=IDEFICS2_CHAT_TEMPLATE)
    assert len(processor.tokenizer) == vocab_size, "the processor must not add tokens"

    text = dict(model_type="mistral", vocab_size=vocab_size, rms_norm_eps=1e-5, pad_token_id=ids["<unk>"],
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], **spec["text"])
    config = Idefics2Config(
        vision_config=dict(spec["vision"]),
        perceiver_config=dict(spec["perceiver"]),
        text_config=text,
        image_token_id=ids["<image>"],
        tie_word_embeddings=False,
    )
    gen = GenerationConfig(bos_token_id=ids["<s>"], pad_token_id=ids["<unk>"],
                           eos_token_id=[ids["<end_of_utterance>"], ids["</s>"]])
    torch.manual_seed(seed)
    processor.save_pretrained(out)
    if save_weights:
        model = Idefics2ForConditionalGeneration(config).eval()
        model.generation_config = gen
        model.save_pretrained(out)
        return out, model
    config.save_pretrained(out)
    gen.save_pretrained(out)
    with torch.device(device):
        model = Idefics2ForConditionalGeneration._from_config(config, dtype=dtype or torch.bfloat16).eval()
    model.generation_config = gen
    return out, model


__all__ = ["IDEFICS2_CHAT_TEMPLATE", "SHAPES", "build_idefics2", "make_tiny_idefics2"]
