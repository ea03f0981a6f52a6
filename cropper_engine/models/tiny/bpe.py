"""The tiny VLMs' BPE tokenizers (the fixed tiny families' and the `--like` tinies'), trained
offline on a small prompt-like corpus: Mistral-like ('▁' spaces, byte fallback) and byte-level
(GPT-2, Qwen2, Llama 3 and SmolLM2 splits)."""

from __future__ import annotations

import random
from typing import Any

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
VOCAB_SIZE = 1000


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


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> character map of byte-level BPE (printable bytes as themselves, the others
    from U+0100: a space is 'Ġ', a newline 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges that make each word one byte-level token, left to right: (g, l), (gl, o), ..., (globa, l)
    ('\\n\\n' is 'ĊĊ' in the byte-level alphabet)."""
    byte_char = _byte_level_chars()
    chained = ("".join(byte_char[b] for b in w.encode()) for w in words)
    return [(w[:k], w[k]) for w in chained for k in range(1, len(w))]


def _tag_words(sheet: dict[str, Any]) -> tuple[str, ...]:
    """The pieces of an Idefics3 sheet's image tags that are more than one character (and not digits):
    the words a tiny's BPE must hold to split the tags as the real tokenizer does."""
    pieces = (p for v in sheet["image_tags"]["strings"].values() for p in (v["pieces"] or ()))
    return tuple(dict.fromkeys(p for p in pieces if len(p) > 1 and not p.isdigit()))


def _force_words(merges: list[tuple[str, str]], learned: list[str], chain: list[tuple[str, str]],
                 unfused: tuple[str, ...]) -> tuple[list[tuple[str, str]], list[str]]:
    """The words' merges first (so each word is one token whatever else BPE learned), and no merge or
    token that fuses one of `unfused` with anything: text the real tokenizer has no token for (an
    Idefics3 image tag) splits into the real tokenizer's pieces."""
    def fused(s: str) -> bool:
        return any(u in s and s != u for u in unfused)
    merges = chain + [m for m in merges if m not in chain and not fused(m[0] + m[1])]
    learned = [t for t in learned if not fused(t)]
    return merges, learned + [a + b for a, b in chain if a + b not in learned]


def _train_bytelevel_tokenizer(seed: int, specials: list[str], tail: list[str], vocab_size: int,
                               split: str | None = None, words: tuple[str, ...] = (), unfused: tuple[str, ...] = ()):
    """A GPT-2 style byte-level BPE ('Ġ' spaces, single digits, no BOS added): `specials` take the
    first ids, `tail` (added special tokens) the last; filler tokens pad the vocabulary between.
    `words` and `unfused` as in `_bytelevel_like_tokenizer`."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    def pre() -> Any:
        if split is not None:  # Qwen2: one regex split, then bytes
            return pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),  # SmolLM
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    chain = _word_merges(words)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(tail) - len(chain), special_tokens=specials,
                                  initial_alphabet=alphabet, min_frequency=1, show_progress=False)
    trainer_tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    learned = [t for _, t in sorted((i, t) for t, i in model["vocab"].items() if t not in specials)]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if chain or unfused:
        merges, learned = _force_words(merges, learned, chain, unfused)
    tokens = specials + learned
    tokens += [f"<filler{i}>" for i in range(vocab_size - len(tail) - len(tokens))]
    tokens += tail
    assert len(tokens) == vocab_size, (len(tokens), vocab_size)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + tail])
    tok.pre_tokenizer = pre()
    tok.decoder = decoders.ByteLevel()
    return tok


def _fast_tokenizer(tok: Any, **kwargs: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **kwargs)


def _like_corpus(seed: int) -> list[str]:
    """Prompt-like text: the instructions, many boxes and numbers, and every integer to 1000."""
    rng = random.Random(seed)
    lines = _corpus(rng)
    for _ in range(300):
        boxes = ", ".join(f"({rng.choice(['5', f'{rng.randint(0, 9)}.{rng.randint(0, 99)}'])}, {rng.randint(1, 1000)}, "
                          f"{rng.randint(1, 1000)}, {rng.randint(1, 1000)}, {rng.randint(1, 1000)})" for _ in range(3))
        lines.append(f"Query image. Answer with {rng.randint(1, 9)} region(s) as (s, x1, y1, x2, y2).\n{boxes}.\n")
        lines.append(f"\n{boxes}\n")  # an example's boxes, as the prompt writes them
    return lines


def _sp_like_tokenizer(seed: int, vocab_size: int, specials: list[str], added: list[str]):
    """A Mistral-like tokenizer: SentencePiece-style BPE ('▁' spaces, a '▁' before every text run as
    the legacy Llama / Mistral tokenizer.json, digits one by one, bytes for what the vocabulary
    lacks: '<0x0A>' for a newline); `specials` first, the 256 byte tokens, the learned pieces,
    fillers, then `added` last (Mistral's 32000..32002 in idefics2)."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def pre() -> Any:
        return pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
                                        pre_tokenizers.Digits(individual_digits=True)])

    n_bytes = 256
    learn = vocab_size - len(specials) - len(added) - n_bytes
    trainer_tok = Tokenizer(models.BPE(unk_token=specials[0]))
    trainer_tok.pre_tokenizer = pre()
    trainer = trainers.BpeTrainer(vocab_size=learn + len(specials), special_tokens=specials,
                                  initial_alphabet=[chr(c) for c in range(32, 127)] + ["▁"], min_frequency=2,
                                  show_progress=False)
    trainer_tok.train_from_iterator(_like_corpus(seed), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    printable = set(map(chr, range(32, 127))) | {"▁"}  # a newline is a byte token, '<0x0A>', as in Mistral's
    learned = sorted((i, t) for t, i in model["vocab"].items() if t not in specials and set(t) <= printable)
    tokens = specials + [f"<0x{b:02X}>" for b in range(n_bytes)] + [t for _, t in learned]
    tokens += [f"▁<filler{i}>" for i in range(vocab_size - len(added) - len(tokens))]
    tokens += added
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merges = [m for m in merges if m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=specials[0], fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + added])
    tok.pre_tokenizer = pre()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return tok


def _bytelevel_like_tokenizer(seed: int, vocab_size: int, head: list[str], tail: list[str], split: str,
                              digit_groups: bool, bos: str | None = None, words: tuple[str, ...] = (),
                              unfused: tuple[str, ...] = ()):
    """A byte-level BPE ('Ġ' for a space, no unknown tokens) with a regex pre-tokenizer: Qwen2's
    (`\\p{N}`: one token per digit), Llama 3's (`\\p{N}{1,3}`: every 1-3 digit number is one token,
    so the vocabulary holds all 1110 of them, as Llama 3's does) or SmolLM2's digit split.
    `head` specials take the first ids, `tail` (the real model's specials and added tokens) the last.
    Each of `words` is one token (its merges come first), and no token holds one of `unfused` with
    anything else: so text the real model has no token for (Idefics3's '<global-img>') splits into
    the real tokenizer's pieces ('<', 'global', '-img', '>' for Llama 3)."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def pre() -> Any:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    numbers = [str(i) for i in range(10)] + [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]
    numbers = list(dict.fromkeys(numbers)) if digit_groups else []
    chain = _word_merges(words)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(tail) - len(numbers) - len(chain), special_tokens=head,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    trainer_tok.train_from_iterator(_like_corpus(seed), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    learned = [t for _, t in sorted((i, t) for t, i in model["vocab"].items() if t not in head)]
    if digit_groups:  # every 2- and 3-digit string a token, reachable whichever pair merges first
        learned = [t for t in learned if not (t.isdigit() and len(t) > 1)]
        merges = [m for m in merges if not (m[0].isdigit() and m[1].isdigit())]
        two = [f"{i:02d}" for i in range(100)]
        three = [f"{i:03d}" for i in range(1000)]
        merges += [(s[0], s[1]) for s in two] + [(s[:2], s[2]) for s in three] + [(s[0], s[1:]) for s in three]
        learned += two + three
    if chain or unfused:
        merges, learned = _force_words(merges, learned, chain, unfused)
    tokens = head + learned
    tokens += [f"<filler{i}>" for i in range(vocab_size - len(tail) - len(tokens))]
    tokens += tail
    assert len(tokens) == vocab_size, (len(tokens), vocab_size)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in head + tail])
    tok.pre_tokenizer = pre()
    tok.decoder = decoders.ByteLevel()
    if bos is not None:  # Llama 3's tokenizer adds <|begin_of_text|>
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    return tok
