"""The box grammar: DFA and regex agree; the token constraint works on SentencePiece and byte-level BPEs."""

from __future__ import annotations

import random
import re
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cropper_engine.engine.grammar import GRAMMAR_CHARS, BoxGrammar, parse_boxes

GOOD_1 = [
    "(4.5, 12, 100, 870, 1000)",
    " (0.73, 1, 1, 999, 1000)",
    "(4, 1, 1, 1, 1)",
    "(4.99, 1, 10, 100, 1000)",
    "(0, 999, 99, 9, 1000)",
    "(5, 500, 500, 501, 501)",
    "(5.0, 1, 1, 1, 1)",
    "(5.00, 1, 1, 1, 1)",
    "(1.05, 1, 1, 1, 1)",
]
BAD_1 = [
    "",
    " ",
    "(4.5, 0, 1, 1, 1)",  # coordinates start at 1
    "(4.5, 1001, 1, 1, 1)",
    "(4.5, 2000, 1, 1, 1)",
    "(4.5, 01, 1, 1, 1)",  # leading zero
    "(4.5, 1, 1, 1, 10000)",
    "(100, 1, 1, 1, 1)",  # score: a MOS from 0 to 5
    "(10.25, 1, 1, 1, 1)",
    "(6, 1, 1, 1, 1)",
    "(5.5, 1, 1, 1, 1)",
    "(5.01, 1, 1, 1, 1)",
    "(99.99, 1, 1, 1, 1)",
    "(05, 1, 1, 1, 1)",
    "(4., 1, 1, 1, 1)",
    "(.5, 1, 1, 1, 1)",
    "(0.123, 1, 1, 1, 1)",
    "(4.5,1, 1, 1, 1)",
    "(4.5 , 1, 1, 1, 1)",
    "  (4.5, 1, 1, 1, 1)",
    "(4.5, 1, 1, 1, 1) ",
    "(4.5, 1, 1, 1, 1),",
    "(4.5, 1, 1, 1)",
    "(4.5, 1, 1, 1, 1, 1)",
    "4.5, 1, 1, 1, 1",
    "(-4.5, 1, 1, 1, 1)",
]


@pytest.mark.parametrize("text", GOOD_1)
def test_dfa_accepts(text):
    g = BoxGrammar()
    assert g.matches(text)
    assert re.fullmatch(g.regex(), text)
    assert parse_boxes(text, g) is not None


@pytest.mark.parametrize("text", BAD_1)
def test_dfa_rejects(text):
    g = BoxGrammar()
    assert not g.matches(text)
    assert not re.fullmatch(g.regex(), text)


def test_several_boxes_and_no_score():
    g = BoxGrammar(boxes=3)
    three = "(4.5, 1, 2, 3, 4), (0.7, 10, 20, 30, 40), (3, 100, 200, 300, 1000)"
    assert g.matches(three)
    assert not g.matches(three.rsplit(", (", 1)[0])  # two boxes
    assert not g.matches(three + ", (4, 1, 1, 1, 1)")  # four
    assert not g.matches(three.replace("), (", "),("))
    assert parse_boxes(three, g) == [(4.5, 1, 2, 3, 4), (0.7, 10, 20, 30, 40), (3, 100, 200, 300, 1000)]
    plain = BoxGrammar(boxes=2, score=False)
    assert plain.matches("(1, 2, 3, 4), (5, 6, 7, 1000)")
    assert not plain.matches("(4.5, 1, 2, 3, 4), (5, 6, 7, 8)")
    assert not BoxGrammar(leading_space=False).matches(" (4, 1, 1, 1, 1)")
    for grammar in (g, plain, BoxGrammar(6)):
        assert grammar.matches(grammar.example())


def test_longest_answer_is_the_longest_the_grammar_allows():
    for g in (BoxGrammar(1), BoxGrammar(6), BoxGrammar(3, score=False), BoxGrammar(2, leading_space=False)):
        text = g.longest()
        assert g.matches(text) and g.boxes == text.count("(")
        state = g.walk(g.start(), text)
        assert g.is_final(state)  # nothing may follow: no longer answer exists on this path
    assert BoxGrammar(6).longest() == " " + ", ".join(["(4.99, 1000, 1000, 1000, 1000)"] * 6)


def test_dfa_final_state_allows_only_eos():
    g = BoxGrammar(2)
    state = g.walk(g.start(), "(4.5, 1, 2, 3, 4), (4.5, 1, 2, 3, 4)")
    assert g.is_accepting(state) and g.is_final(state)
    mid = g.walk(g.start(), "(4.5, 1, 2, 3, 4), (4.5, 1, 2, 3, 100")
    assert mid is not None and not g.is_accepting(mid)
    assert g.step(mid, "0") is not None  # 1000
    assert g.step(g.step(mid, "0"), "0") is None  # 10000


def test_importing_the_grammar_is_cheap():
    import subprocess

    code = ("import sys; import cropper_engine.engine.grammar as g; g.BoxGrammar(6).regex(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_box_count():
    from cropper_engine.errors import InputError

    with pytest.raises(InputError):
        BoxGrammar(0)


# --- regex and DFA agree ------------------------------------------------------------------

GRAMMARS = [BoxGrammar(1), BoxGrammar(2), BoxGrammar(1, score=False), BoxGrammar(2, leading_space=False)]


def _mutate(text: str, rnd: random.Random) -> str:
    chars = list(text)
    for _ in range(rnd.randint(1, 2)):
        op = rnd.randrange(3)
        pos = rnd.randrange(len(chars) + 1)
        if op == 0 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif op == 1:
            chars.insert(pos, rnd.choice(sorted(GRAMMAR_CHARS)))
        elif chars:
            chars[min(pos, len(chars) - 1)] = rnd.choice(sorted(GRAMMAR_CHARS))
    return "".join(chars)


@st.composite
def near_miss(draw, grammar: BoxGrammar):
    """Valid answers drawn from the regex, then (mostly) mutated by a character or two."""
    text = draw(st.from_regex(grammar.regex(), fullmatch=True))
    if draw(st.booleans()):
        text = _mutate(text, random.Random(draw(st.integers(0, 2**32))))
    return text


@pytest.mark.parametrize("grammar", GRAMMARS, ids=lambda g: f"b{g.boxes}s{int(g.score)}l{int(g.leading_space)}")
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_regex_and_dfa_agree(grammar, data):
    text = data.draw(st.one_of(near_miss(grammar), st.text(alphabet=sorted(GRAMMAR_CHARS), max_size=40)))
    assert grammar.matches(text) == bool(re.fullmatch(grammar.regex(), text)), repr(text)


# --- the token constraint, without a model ------------------------------------------------


def _byte_level_tokenizer():
    """A GPT-2 style byte-level BPE ('Ġ' spaces), trained in a blink."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rnd = random.Random(0)
    corpus = [", ".join(f"({rnd.randint(0, 9)}.{rnd.randint(0, 99)}, {rnd.randint(1, 1000)}, "
                        f"{rnd.randint(1, 1000)}, {rnd.randint(1, 1000)}, {rnd.randint(1, 1000)})"
                        for _ in range(3)) for _ in range(200)] + ["hello world, this is text"] * 10
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _drive(constraint, vocab: int, rows: int, steps: int, seed: int):
    """Sample from random logits through the constraint, as generate would."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros((rows, 3), dtype=torch.long)  # a fake prompt
    for _ in range(steps):
        scores = constraint(ids, torch.randn((rows, vocab), generator=gen) * 3)
        assert torch.isfinite(scores).any(dim=1).all()
        nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, 3:]


def test_token_constraint_byte_level():
    from cropper_engine.engine.grammar import TokenConstraint, token_strings

    tok = _byte_level_tokenizer()
    strings = token_strings(tok)
    assert any(s.startswith(" ") for s in strings.values()), "'Ġ' must decode to a space"
    assert all(set(s) <= GRAMMAR_CHARS for s in strings.values())
    grammar = BoxGrammar(3)
    eos = tok.eos_token_id
    constraint = TokenConstraint(tok, grammar)
    out = _drive(constraint, len(tok), rows=6, steps=120, seed=1)
    for row in out.tolist():
        assert eos in row, "every row must finish with EOS"
        text = tok.decode(row[:row.index(eos)], clean_up_tokenization_spaces=False)
        assert parse_boxes(text, grammar) is not None, text


def test_answer_token_limit_holds_every_constrained_answer():
    """The limit is the longest answer in the tokenizer's tokens + the end token: with a token per
    grammar character (as Mistral's, Llama 3's and Qwen2's), the characters + 1; sampling through
    the constraint from random logits (any tokenization) always ends with EOS within it."""
    from cropper_engine.engine.grammar import TokenConstraint, answer_token_limit

    tok = _byte_level_tokenizer()
    for boxes in (1, 6):
        grammar = BoxGrammar(boxes)
        limit = answer_token_limit(tok, grammar)
        assert limit == len(grammar.longest()) + 1 == 1 + boxes * 30 + (boxes - 1) * 2 + 1
        assert grammar.matches(grammar.longest())
        assert len(tok(grammar.longest()).input_ids) < limit  # the canonical tokens merge digits
    grammar = BoxGrammar(2)
    limit = answer_token_limit(tok, grammar)
    out = _drive(TokenConstraint(tok, grammar), len(tok), rows=16, steps=limit, seed=4)
    for row in out.tolist():
        assert tok.eos_token_id in row, "an answer ran past the limit"


def test_logits_processor_type_and_reset():
    from transformers import LogitsProcessor

    from cropper_engine.engine import grammar as grammar_module

    tok = _byte_level_tokenizer()
    constraint = grammar_module.TokenConstraint(tok, BoxGrammar(1))
    assert isinstance(constraint, LogitsProcessor)
    _drive(constraint, len(tok), rows=2, steps=5, seed=0)
    assert constraint.states[0] != BoxGrammar(1).start()
    constraint.reset()
    assert constraint.states == []
