"""The parser of VLM answers: repairs what it can, never raises."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cropper_engine.engine.parse import parse_boxes


def coords(res):
    return [b.as_tuple() for b in res.boxes]


def test_clean_paper_format():
    res = parse_boxes("(4.5, 100, 200, 800, 900), (3, 1, 1, 1000, 1000)", expected=2)
    assert coords(res) == [(100, 200, 800, 900), (1, 1, 1000, 1000)]
    assert [b.s for b in res.boxes] == [4.5, 3]
    assert res.repairs == []


@pytest.mark.parametrize("text,expected,repair", [
    ("Sure! The best crop is (5, 120, 80, 900, 950). Hope this helps.", (120, 80, 900, 950), None),
    ("```\n[5, 120, 80, 900, 950]\n```", (120, 80, 900, 950), "code fences"),
    ("{5, 120, 80, 900, 950}", (120, 80, 900, 950), None),
    ("<5, 120, 80, 900, 950>", (120, 80, 900, 950), None),
    ("(120, 80, 900, 950)", (120, 80, 900, 950), "missing score"),
    ("x1=120, y1=80, x2=900, y2=950", (120, 80, 900, 950), "missing score"),
    ("(5, 900, 950, 120, 80)", (120, 80, 900, 950), "swapped"),
    ("(5, -20, 80, 1200, 950)", (1, 80, 1000, 950), "clamped"),
])
def test_repairs(text, expected, repair):
    res = parse_boxes(text, expected=1)
    assert coords(res) == [expected]
    if repair:
        assert any(repair in r for r in res.repairs), res.repairs


def test_unit_floats_scaled():
    res = parse_boxes("(0.8, 0.1, 0.2, 0.9, 0.7)", expected=1)
    (x1, y1, x2, y2), = coords(res)
    # 1 + 0.1 * 999 = 100.9 ; 1 + 0.9 * 999 = 900.1
    assert (x1, y1, x2, y2) == pytest.approx((100.9, 200.8, 900.1, 700.3))
    assert any("0..1" in r for r in res.repairs)


def test_too_many_and_too_few():
    many = parse_boxes(", ".join(f"(5, {10 + i}, 10, 900, 900)" for i in range(8)), expected=6)
    assert len(many.boxes) == 6 and any("kept the first 6" in r for r in many.repairs)
    few = parse_boxes("(5, 10, 10, 900, 900)", expected=6)
    assert len(few.boxes) == 1 and any("1 of 6" in r for r in few.repairs)


def test_an_answer_cut_short_is_no_box():
    """Read in order, the numbers of a cut box would make a wrong box: (123, 100, 789, 456)."""
    res = parse_boxes("(4.5, 123, 456, 789, 100", expected=1)
    assert not res.ok and "unfinished box at the end dropped" in res.repairs
    two = parse_boxes("(4.5, 100, 200, 800, 900), (3, 1, 1, 10", expected=2)
    assert coords(two) == [(100, 200, 800, 900)]
    assert coords(parse_boxes("(4.5, 100, 200, 800, 900)")) == [(100, 200, 800, 900)]


def test_degenerate_and_garbage():
    res = parse_boxes("(5, 100, 100, 100, 900)")  # a line: widened to one unit, not lost
    assert coords(res) == [(99.5, 100, 100.5, 900)] and "degenerate boxes widened" in res.repairs
    assert coords(parse_boxes("(5, 1000, 1, 1000, 1)")) == [(999, 1, 1000, 2)]
    assert not parse_boxes("I cannot help with that.").ok
    assert not parse_boxes("").ok
    assert not parse_boxes(None).ok
    assert not parse_boxes("nan nan nan nan nan").ok
    huge = parse_boxes("(" * 100_000 + "5, 1, 1, 500, 500" + ")" * 100_000)
    assert isinstance(huge.boxes, list)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_never_raises_on_random_text(text):
    res = parse_boxes(text, expected=6)
    assert len(res.boxes) <= 6
    for b in res.boxes:
        assert 1 <= b.x1 < b.x2 <= 1000 and 1 <= b.y1 < b.y2 <= 1000


adversarial = st.lists(st.one_of(
    st.sampled_from(["(", ")", "[", "]", "{", "}", "<", ">", ",", " ", "\n", "```", "s=", "x1:", "e", ".", "-"]),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(adversarial)
def test_never_raises_on_adversarial_text(text):
    res = parse_boxes(text, expected=3)
    for b in res.boxes:
        assert 1 <= b.x1 < b.x2 <= 1000 and 1 <= b.y1 < b.y2 <= 1000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1000), st.integers(1, 1000), st.integers(1, 1000),
                          st.integers(1, 1000), st.integers(0, 9)), min_size=1, max_size=6))
def test_well_formed_boxes_round_trip(boxes):
    text = ", ".join(f"({s}, {a}, {b}, {c}, {d})" for a, b, c, d, s in boxes)
    res = parse_boxes(text)
    def span(p, q):  # a zero-width span becomes one unit about its point, kept inside 1..1000
        if p != q:
            return min(p, q), max(p, q)
        mid = min(max(p, 1.5), 999.5)
        return mid - 0.5, mid + 0.5

    want = []
    for a, b, c, d, _ in boxes:
        (x1, x2), (y1, y2) = span(a, c), span(b, d)
        want.append((x1, y1, x2, y2))
    assert coords(res) == want
