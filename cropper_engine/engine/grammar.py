"""The answer format of the paper as a grammar: a regex, a character DFA and a token constraint.

An answer is exactly `boxes` boxes `(s, x1, y1, x2, y2)` separated by ", " (the loop asks for R
in one answer by default, one per sample in parallel mode; `BoxGrammar.boxes` says how many one
answer holds, `longest()` is its longest text), with coordinates integers 1..1000 (no
leading zeros) and `s` a MOS on the prompt's scale, 0 to 5 with at most 2 decimals (`4`, `4.5`,
`0.73`, `5.0`; the prompt says s runs from 1 to 5). `score=False` drops `s`. One optional space
may lead the answer: after "Assistant:" a SentencePiece model naturally starts with a '▁'-prefixed token such as "▁(".

`TokenConstraint` turns the DFA into a transformers LogitsProcessor: only tokens that keep the text
inside the grammar may be sampled, and EOS only once the text is complete.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

GRAMMAR_CHARS = frozenset("0123456789.,() ")
_DIGITS = "0123456789"

# Number sub-automata: {state: {char: next}}, with the states that may end the number.
_COORD = {  # 1..999 or 1000
    "s": {"1": "one", **{d: "a1" for d in "23456789"}},
    "a1": {d: "a2" for d in _DIGITS},
    "one": {"0": "ten", **{d: "a2" for d in "123456789"}},
    "a2": {d: "a3" for d in _DIGITS},
    "ten": {"0": "hundred", **{d: "a3" for d in "123456789"}},
    "a3": {},
    "hundred": {"0": "thousand"},
    "thousand": {},
}
_COORD_END = frozenset({"a1", "one", "a2", "ten", "a3", "hundred", "thousand"})
_SCORE = {  # 0..4 with up to 2 decimals, or 5, 5.0, 5.00: a MOS from 0 to 5
    "s": {**{d: "i1" for d in "01234"}, "5": "five"},
    "i1": {".": "point"},
    "point": {d: "f1" for d in _DIGITS},
    "f1": {d: "f2" for d in _DIGITS},
    "f2": {},
    "five": {".": "five_point"},
    "five_point": {"0": "five_f1"},
    "five_f1": {"0": "five_f2"},
    "five_f2": {},
}
_SCORE_END = frozenset({"i1", "f1", "f2", "five", "five_f1", "five_f2"})
_NUMBERS = {"coord": (_COORD, _COORD_END), "score": (_SCORE, _SCORE_END)}

# Plain groups only (no `(?:`): every structured-output backend's regex dialect takes them.
COORD_REGEX = r"(1000|[1-9][0-9]{0,2})"
SCORE_REGEX = r"(5(\.00?)?|[0-4](\.[0-9]{1,2})?)"


@dataclass(frozen=True)
class BoxGrammar:
    """`boxes` boxes `(s, x1, y1, x2, y2)` (or `(x1, y1, x2, y2)` without score) joined by ", "."""

    boxes: int = 1
    score: bool = True
    leading_space: bool = True
    _table: list[dict[str, int]] = field(init=False, repr=False, compare=False)
    _accept: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.boxes < 1:
            from cropper_engine.errors import InputError

            raise InputError(f"a box grammar needs at least one box, got boxes={self.boxes}")
        table, accept = _compile(self._elements())
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_accept", accept)

    # --- the format -------------------------------------------------------------------
    def _elements(self) -> list[tuple[str, str]]:
        box: list[tuple[str, str]] = [("lit", "(")]
        fields = (["score"] if self.score else []) + ["coord"] * 4
        for i, kind in enumerate(fields):
            if i:
                box += [("lit", ","), ("lit", " ")]
            box.append(("num", kind))
        box.append(("lit", ")"))
        out: list[tuple[str, str]] = [("opt", " ")] if self.leading_space else []
        for i in range(self.boxes):
            if i:
                out += [("lit", ","), ("lit", " ")]
            out += box
        return out

    def regex(self) -> str:
        """A standard regex (Python `re`, outlines / vLLM structured outputs) for the whole answer."""
        fields = ([SCORE_REGEX] if self.score else []) + [COORD_REGEX] * 4
        box = r"\(" + ", ".join(fields) + r"\)"
        body = box if self.boxes == 1 else box + "(, " + box + "){" + str(self.boxes - 1) + "}"
        return ("( )?" if self.leading_space else "") + body

    def example(self) -> str:
        box = "(" + ", ".join((["4.5"] if self.score else []) + ["1", "1", "1000", "1000"]) + ")"
        return ", ".join([box] * self.boxes)

    def longest(self) -> str:
        """The longest answer the grammar allows, in characters (a score of 4, coordinates of 4)."""
        box = "(" + ", ".join((["4.99"] if self.score else []) + ["1000"] * 4) + ")"
        return (" " if self.leading_space else "") + ", ".join([box] * self.boxes)

    # --- the DFA ------------------------------------------------------------------------
    def start(self) -> int:
        return 0

    def step(self, state: int, ch: str) -> int | None:
        return self._table[state].get(ch)

    def walk(self, state: int | None, text: str) -> int | None:
        for ch in text:
            if state is None:
                return None
            state = self._table[state].get(ch)
        return state

    def is_accepting(self, state: int | None) -> bool:
        return state in self._accept

    def is_final(self, state: int) -> bool:
        """Accepting with no way to go on: only EOS may follow."""
        return state in self._accept and not self._table[state]

    def matches(self, text: str) -> bool:
        return self.is_accepting(self.walk(self.start(), text))

    @property
    def n_states(self) -> int:
        return len(self._table)


def _compile(elements: list[tuple[str, str]]) -> tuple[list[dict[str, int]], frozenset[int]]:
    """Element list -> explicit DFA table by exploring from the start state.

    A position is (element index, sub-state of a number or None). Numbers end where the next
    literal starts; digits, '.' and the literals never overlap, so the result is deterministic.
    """
    n = len(elements)

    def closure(pos: tuple[int, str | None]) -> list[tuple[int, str | None]]:
        # Positions reachable without reading: past an optional literal, past an ended number.
        out, todo = [], [pos]
        while todo:
            i, sub = todo.pop()
            out.append((i, sub))
            if i < n:
                kind, arg = elements[i]
                ended = kind == "num" and sub is not None and sub in _NUMBERS[arg][1]
                if kind == "opt" or ended:
                    todo.append((i + 1, None))
        return out

    def move(pos: tuple[int, str | None], ch: str) -> tuple[int, str | None] | None:
        i, sub = pos
        if i >= n:
            return None
        kind, arg = elements[i]
        if kind in ("lit", "opt"):
            return (i + 1, None) if ch == arg else None
        auto = _NUMBERS[arg][0]
        nxt = auto[sub or "s"].get(ch)
        return (i, nxt) if nxt is not None else None

    def is_end(positions: frozenset) -> bool:
        return any(i == n for i, _ in positions)

    start = frozenset(closure((0, None)))
    ids: dict[frozenset, int] = {start: 0}
    table: list[dict[str, int]] = [{}]
    todo = [start]
    while todo:
        cur = todo.pop()
        row = table[ids[cur]]
        for ch in sorted(GRAMMAR_CHARS):
            nxt: set = set()
            for pos in cur:
                moved = move(pos, ch)
                if moved is not None:
                    nxt.update(closure(moved))
            if not nxt:
                continue
            key = frozenset(nxt)
            if key not in ids:
                ids[key] = len(table)
                table.append({})
                todo.append(key)
            row[ch] = ids[key]
    accept = frozenset(i for key, i in ids.items() if is_end(key))
    return table, accept


def parse_boxes(text: str, grammar: BoxGrammar) -> list[tuple[float, ...]] | None:
    """Strict parse of a grammar-conforming answer (tests, sanity checks); None if it does not match."""
    if not re.fullmatch(grammar.regex(), text):
        return None
    return [tuple(float(v) for v in m.split(", ")) for m in re.findall(r"\(([^)]*)\)", text)]


# --- token constraint ---------------------------------------------------------------------

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE_MARKS = str.maketrans({"▁": " ", "Ġ": " "})


def token_strings(tokenizer: Any) -> dict[int, str]:
    """The text each token adds when it follows other text, for tokens made only of grammar chars.

    A token is decoded after an anchor ("0") and the anchor's text cut off, so SentencePiece '▁',
    byte-level 'Ġ' and byte-fallback `<0x20>` all come out as real spaces, and no decoder strips
    a leading space. Tokens whose raw form cannot give grammar chars are skipped before decoding.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    vocab: dict[str, int] = tokenizer.get_vocab()
    candidates = []
    for raw, tid in vocab.items():
        if tid in special:
            continue
        if _BYTE_TOKEN.fullmatch(raw) or (raw and set(raw.translate(_SPACE_MARKS)) <= GRAMMAR_CHARS):
            candidates.append(tid)
    anchor = tokenizer.encode("0", add_special_tokens=False)
    anchor_text = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode([[*anchor, t] for t in candidates], clean_up_tokenization_spaces=False)
    out: dict[int, str] = {}
    for tid, text in zip(candidates, decoded, strict=True):
        if not text.startswith(anchor_text):
            continue
        piece = text[len(anchor_text):]
        if piece and set(piece) <= GRAMMAR_CHARS:
            out[tid] = piece
    return out


def _default_eos_ids(tokenizer: Any) -> list[int]:
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    eou = tokenizer.get_vocab().get("<end_of_utterance>")
    if eou is not None and eou not in ids:
        ids.append(int(eou))
    return ids


class _Compiled:
    """What one (tokenizer, grammar, EOS ids) needs at every step, computed once and shared."""

    def __init__(self, strings: dict[int, str], grammar: BoxGrammar, eos_ids: tuple[int, ...]):
        self.strings = strings
        self.grammar = grammar
        self.eos_ids = eos_ids
        # DFA state -> (allowed ids, {token id: next state}); filled lazily: few states are visited.
        self._allowed: dict[int, tuple[list[int], dict[int, int]]] = {}
        self._masks: dict[tuple[int, int, str, Any], Any] = {}

    def allowed(self, state: int) -> tuple[list[int], dict[int, int]]:
        hit = self._allowed.get(state)
        if hit is None:
            nxt: dict[int, int] = {}
            for tid, text in self.strings.items():
                end = self.grammar.walk(state, text)
                if end is not None:
                    nxt[tid] = end
            ids = sorted(nxt)
            if self.grammar.is_accepting(state):
                ids = sorted(set(ids) | set(self.eos_ids))
            hit = self._allowed[state] = (ids, nxt)
        return hit

    def mask(self, key: int, vocab: int, like: Any) -> Any:
        """Additive mask (0 allowed, -inf not) for a DFA state; key -1: EOS only."""
        import torch

        cache_key = (key, vocab, str(like.device), like.dtype)
        mask = self._masks.get(cache_key)
        if mask is None:
            ids = list(self.eos_ids) if key < 0 else (self.allowed(key)[0] or list(self.eos_ids))
            mask = torch.full((vocab,), float("-inf"), dtype=like.dtype, device=like.device)
            mask[torch.tensor([i for i in ids if i < vocab], dtype=torch.long, device=like.device)] = 0
            self._masks[cache_key] = mask
        return mask


def answer_token_limit(tokenizer: Any, grammar: BoxGrammar, eos_token_ids: Iterable[int] | None = None) -> int:
    """The most tokens an answer of `grammar` can take with this tokenizer, plus the end token.

    The longest path through the grammar's DFA where every step is one token the constraint
    allows: any answer the constrained decoder can write fits, however it splits the text into
    tokens. With a tokenizer that has a token for each grammar character (Mistral, Llama 3 and
    Qwen2 have, and give every digit its own) it is the longest answer's length in characters + 1.
    """
    eos = list(eos_token_ids) if eos_token_ids is not None else (_default_eos_ids(tokenizer) or [-1])
    compiled = compile_constraint(tokenizer, grammar, eos)  # the end ids do not change the count
    longest: dict[int, int] = {}

    def walk(state: int) -> int:  # tokens still to come from `state`, the end token included
        hit = longest.get(state)
        if hit is None:
            best = 1 if grammar.is_accepting(state) else -(1 << 30)
            for nxt in set(compiled.allowed(state)[1].values()):  # the DFA is acyclic: tokens add text
                best = max(best, 1 + walk(nxt))
            hit = longest[state] = best
        return hit

    out = walk(grammar.start())
    if out < 1:
        from cropper_engine.errors import InputError

        raise InputError("the tokenizer cannot write a box of the grammar (no token for its characters)")
    return out


_TOKENIZERS: dict[int, tuple[Any, dict[int, str]]] = {}
_COMPILED: dict[tuple[int, BoxGrammar, tuple[int, ...]], _Compiled] = {}


def compile_constraint(tokenizer: Any, grammar: BoxGrammar,
                       eos_token_ids: Iterable[int] | None = None) -> _Compiled:
    """The shared step tables for a tokenizer and grammar (cached: built once per pair)."""
    eos = tuple(sorted(set(eos_token_ids if eos_token_ids is not None else _default_eos_ids(tokenizer))))
    if not eos:
        from cropper_engine.errors import InputError

        raise InputError("constrained decoding needs an EOS token id; the tokenizer has none")
    hit = _TOKENIZERS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:  # an id can be reused after a tokenizer is freed
        hit = _TOKENIZERS[id(tokenizer)] = (tokenizer, token_strings(tokenizer))
        for key in [k for k in _COMPILED if k[0] == id(tokenizer)]:
            del _COMPILED[key]
    key = (id(tokenizer), grammar, eos)
    if key not in _COMPILED:
        _COMPILED[key] = _Compiled(hit[1], grammar, eos)
    return _COMPILED[key]


class _TokenConstraintMixin:
    """The logic of TokenConstraint; rows are batch x num_return_sequences, tracked one by one.

    Row states advance over the tokens generated since the first call. Use one instance per
    generate call, or call `reset()` between calls.
    """

    def __init__(self, tokenizer: Any, grammar: BoxGrammar, eos_token_ids: Iterable[int] | None = None):
        self.grammar = grammar
        self.compiled = compile_constraint(tokenizer, grammar, eos_token_ids)
        self.eos_ids = frozenset(self.compiled.eos_ids)
        self.reset()

    def reset(self) -> None:
        self._prompt_len = -1
        self._seen = 0
        self._states: list[int | None] = []
        self._done: list[bool] = []

    @property
    def states(self) -> list[int | None]:
        return list(self._states)

    def _advance(self, input_ids: Any) -> None:
        rows, length = input_ids.shape
        if self._prompt_len < 0 or rows != len(self._states) or length < self._prompt_len + self._seen:
            self._prompt_len, self._seen = length, 0
            self._states = [self.grammar.start()] * rows
            self._done = [False] * rows
            return
        new = input_ids[:, self._prompt_len + self._seen:].tolist()
        self._seen = length - self._prompt_len
        for r, tokens in enumerate(new):
            for tid in tokens:
                state = self._states[r]
                if self._done[r]:
                    break
                if tid in self.eos_ids or state is None:
                    self._done[r] = True
                    break
                self._states[r] = self.compiled.allowed(state)[1].get(tid)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self._advance(input_ids)
        vocab = scores.shape[-1]
        # No token allowed (a row left the grammar, or finished): EOS only.
        keys = [-1 if done or state is None else state
                for state, done in zip(self._states, self._done, strict=True)]
        masks = {k: self.compiled.mask(k, vocab, scores) for k in set(keys)}
        return scores + torch.stack([masks[k] for k in keys])


_CLASS: type | None = None


def _token_constraint_class() -> type:
    global _CLASS
    if _CLASS is None:
        from transformers import LogitsProcessor

        class TokenConstraint(_TokenConstraintMixin, LogitsProcessor):
            """A transformers LogitsProcessor that keeps generation inside a BoxGrammar, then EOS."""

        TokenConstraint.__module__ = __name__
        _CLASS = TokenConstraint
    return _CLASS


def __getattr__(name: str) -> Any:
    # `TokenConstraint` subclasses transformers.LogitsProcessor; build it on first use so that
    # importing this module (for BoxGrammar) does not import transformers.
    if name == "TokenConstraint":
        return _token_constraint_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # noqa: F822 - TokenConstraint comes from the module __getattr__
    "GRAMMAR_CHARS", "BoxGrammar", "TokenConstraint", "answer_token_limit", "compile_constraint", "parse_boxes",
    "token_strings",
]
