"""The `equations` annotator (stages/annotators/equations.py): arithmetic checked, no model.

Responses are word-problem answers like SmolLM2's (docs/real_model.md quotes real ones); the
tokenizer is a tiny byte-level BPE (tests/tiny.py), so spans go through the same alignment as
every annotator's.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from tiny import make_tokenizer
from trace_rl.stages.annotators import AnnotateConfig, annotate_rows
from trace_rl.stages.annotators.equations import evaluate, find_equations, key_equations


def test_evaluate_uses_precedence_and_skips_unit_words() -> None:
    assert evaluate("2 + 3 * 4")[0] == 14
    assert evaluate("20 - 6 / 3")[0] == 18
    assert evaluate("8 bags of stickers * 5 stickers/bag")[0] == 40
    assert evaluate("5 \\times 3")[0] == 15 and evaluate("7 x 4")[0] == 28
    assert evaluate("1,200 ÷ 4")[0] == 300
    assert evaluate("3 / 0")[0] is None


def test_equations_are_found_and_checked_property() -> None:
    """Property: in a sentence with one written equation, the equation is found with its exact
    character span, and it is wrong exactly when its result differs from the true value."""
    rng = random.Random(0)
    for _ in range(400):
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        op = rng.choice(["+", "-", "*", "x", "/"])
        true = {"+": a + b, "-": a - b, "*": a * b, "x": a * b, "/": Fraction(a, b)}[op]
        if isinstance(true, Fraction) and true.denominator != 1:
            continue
        written = int(true) + rng.choice([0, 0, 1, -1, 10])
        eq = f"{a:,} {op} {b} = {written}"
        text = f"Sam has {rng.randint(2, 9)} boxes, so he has {eq} apples now."
        (found,) = find_equations(text)
        assert text[found.start:found.end] == eq
        assert (found.wrong_at is not None) == (written != true), eq
        if found.wrong_at is not None:
            assert text[found.wrong_start:found.wrong_end] == str(written)


def test_chains_and_running_totals() -> None:
    (eq,) = find_equations("So 3 x 4 = 12 + 1 = 13 cookies.")  # a running total, right
    assert eq.wrong_at is None and eq.result == 13
    (eq,) = find_equations("Then 2 + 2 = 4 = 5.")
    assert eq.wrong_at == 2
    (eq,) = find_equations("Tom buys 4 bags of cookies * 4 cookies per bag = 16 cookies.")
    assert eq.wrong_at is None and eq.operands == (4, 4)
    assert find_equations("Sam has 12 apples and 3 pears.") == []
    assert find_equations("8x = 24, so x is 3.") == []  # algebra, not arithmetic


def test_key_equations_trace_what_produces_the_answer() -> None:
    text = "The boxes hold 5 * 7 = 35 apples. She ate 2 + 2 = 4. In total 35 + 13 = 48 apples."
    chosen = key_equations(find_equations(text), Fraction(48))
    assert [text[e.start:e.end] for e in chosen] == ["35 + 13 = 48", "5 * 7 = 35"]
    assert key_equations(find_equations(text), Fraction(50)) == []


def _item(tok, rid: str, route: str, text: str, answer: str) -> dict:
    ids = tok.encode(text, add_special_tokens=False)
    return {"rollout_id": rid, "route": route, "problem": "p", "answer": answer,
            "solution": "", "meta": "{}", "response_token_ids": ids,
            "response_text": tok.decode(ids)}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_rows_mark_the_first_wrong_equation_and_the_key_steps(tok) -> None:
    items = [
        # Incorrect: 28 + 15 is 43; the later equation is right given 33 but is not the first error.
        _item(tok, "e1", "error", "Lily has 28 + 15 = 33 apples left, so she has 33 - 15 = 18 "
              "apples now after she gives some of them away to her good friend today.", "27"),
        # Incorrect with right arithmetic: no span, and a note saying why.
        _item(tok, "e2", "error", "Jack has 14 - 11 = 3 pencils left.", "25"),
        _item(tok, "k1", "key", "The boxes hold 5 * 7 = 35 apples, and that is a lot of apples "
              "for one girl. In total Lily has 35 + 13 = 48 apples. The answer is 48.", "48"),
        _item(tok, "n1", "none", "The answer is 48.", "48"),
    ]
    rows = annotate_rows(AnnotateConfig(backend="equations", coverage_cap=0.5), items, tok,
                         progress=False)
    by = {r["rollout_id"]: r for r in rows}
    assert {r["annotator"] for r in rows} == {"equations"}
    e1 = by["e1"]
    assert e1["status"] == "ok" and len(e1["spans"]) == 1
    s = e1["spans"][0]
    text = items[0]["response_text"]
    assert text[s["char_start"]:s["char_end"]] == "28 + 15 = 33"
    assert "43" in s["label"]
    assert by["e2"]["status"] == "no_spans" and "no wrong equation" in by["e2"]["error"]
    k1 = by["k1"]
    assert k1["status"] == "ok"
    key_text = items[2]["response_text"]
    assert [key_text[s["char_start"]:s["char_end"]] for s in k1["spans"]] == [
        "5 * 7 = 35", "35 + 13 = 48"]
    assert by["n1"]["status"] == "skipped"
    for r, it in zip(rows, items, strict=True):
        n = len(it["response_token_ids"])
        for s in r["spans"]:  # token spans cover exactly their characters' tokens
            assert 0 <= s["token_start"] < s["token_end"] <= n
        # NULL wherever nothing was distilled from the row; a number only beside spans
        assert (r["coverage"] is None) == (not r["spans"]) == (r["status"] != "ok")
        assert r["coverage"] is None or r["coverage"] <= 0.5 + 1e-9


def test_the_cap_keeps_the_wrong_result_never_the_opening(tok) -> None:
    """A wrong equation wider than the cap is cut to the result it writes, not to its first
    tokens; when not even that fits, the row is too_broad (no spans: unannotated)."""
    text = "Jack has 14 - 11 = 2 pencils left."
    item = _item(tok, "e", "error", text, "25")
    n = len(item["response_token_ids"])
    eq_tokens = len(tok.encode("14 - 11 = 2", add_special_tokens=False))
    cap = (eq_tokens - 1) / n  # the equation does not fit; its result does
    (row,) = annotate_rows(AnnotateConfig(backend="equations", coverage_cap=cap), [item], tok,
                           progress=False)
    assert row["status"] == "ok", row
    (s,) = row["spans"]
    assert item["response_text"][s["char_start"]:s["char_end"]] == "2"
    (row,) = annotate_rows(AnnotateConfig(backend="equations", coverage_cap=0.5 / n), [item],
                           tok, progress=False)
    assert row["status"] == "too_broad" and row["spans"] == [] and row["coverage"] is None


# Issue 26: rounding to the shown decimals, signs, currency and percent signs, remainders,
# thousands separators, chains, operators, "=" next to other signs.
CASES = Path(__file__).parent / "fixtures" / "equation_cases.jsonl"


def _first_wrong(text: str) -> str | None:
    wrong = [e for e in find_equations(text) if e.wrong_at is not None]
    return text[wrong[0].start:wrong[0].end] if wrong else None


def test_cases_mark_the_first_real_error() -> None:
    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    assert len(cases) >= 50
    misread = [(c["text"], c["first_error"], _first_wrong(c["text"])) for c in cases
               if _first_wrong(c["text"]) != c["first_error"]]
    assert misread == []


def test_property_a_result_rounded_to_its_decimals_is_right() -> None:
    """Property: "a / b = r" with r the quotient rounded to d decimals is right; moved by one
    unit of its last decimal it is wrong (the quotient is then outside r's rounding interval)."""
    rng = random.Random(1)
    for _ in range(300):
        a, b, d = rng.randint(1, 999), rng.randint(2, 97), rng.randint(1, 4)
        true = Fraction(a, b)
        r = round(true, d)
        if abs(true - r) == Fraction(1, 2 * 10**d):
            continue  # a tie: both neighbours are as close
        for shown, ok in ((r, True), (r + Fraction(1, 10**d), False), (r - Fraction(1, 10**d), False)):
            text = f"Each gets {a} / {b} = {float(shown):.{d}f} cups."
            (eq,) = find_equations(text)
            assert (eq.wrong_at is None) == ok, text


def test_property_remainders_are_checked() -> None:
    """Property: "a / b = q remainder r" (and "q R r") is right exactly when q, r = divmod(a, b)."""
    rng = random.Random(2)
    for _ in range(300):
        a, b = rng.randint(1, 500), rng.randint(2, 20)
        q, r = divmod(a, b)
        dq, dr = rng.choice([(0, 0), (0, 0), (0, 1), (-1, b), (1, -b), (1, 0)])
        if r + dr < 0 or q + dq < 0:
            continue
        word = rng.choice(["remainder", "R", "r"])
        text = f"So {a} / {b} = {q + dq} {word} {r + dr} sweets are left."
        (eq,) = find_equations(text)
        assert (eq.wrong_at is None) == ((dq, dr) == (0, 0)), text


def test_signs_percents_and_currency_are_read() -> None:
    (eq,) = find_equations("The change is -5 + 3 = -2 degrees.")
    assert eq.wrong_at is None and eq.operands == (-5, 3) and eq.result == -2
    assert evaluate("4 * -2")[0] == -8 and evaluate("20% of 50")[0] == 10
    assert evaluate("$12.50 * 2")[0] == 25 and evaluate("50% + 20%")[0] == Fraction(7, 10)
    (eq,) = find_equations("- 5 + 3 = 8 apples.")  # a bullet, not a sign
    assert eq.wrong_at is None and eq.operands == (5, 3)
    assert find_equations("We check 2 + 2 >= 5 and 2 + 2 != 5 and 2 + 2 == 5.") == []


@pytest.mark.parametrize(
    ("text", "marked", "wrong_part", "says"),
    [
        ("Each friend gets 10 / 3 = 3.33 cookies, and 3 * 4 = 13 cookies are left over.",
         "3 * 4 = 13", "13", "12, not 13"),
        ("The toys cost $5 + $3 = $9 in all, which is what the shop asked for them.",
         "$5 + $3 = $9", "$9", "8, not 9"),
        ("The change is -5 + 3 = 2 degrees, which is a small change in the weather.",
         "-5 + 3 = 2", "2", "-2, not 2"),
        ("So 17 / 5 = 3 remainder 2 marbles, and 17 / 5 = 2 R 7 marbles in the other bag.",
         "17 / 5 = 2 R 7", "2 R 7", "3 remainder 2, not 2 R 7"),
        ("Costs 20% of 50 = 12 dollars, with 1,200 + 300 = 1,500 more for the rest.",
         "20% of 50 = 12", "12", "10, not 12"),
    ],
)
def test_spans_land_on_the_tokens_of_the_new_readings(
    tok, text: str, marked: str, wrong_part: str, says: str
) -> None:
    """The error span of each new reading covers the tokens of the wrong equation (and, cut
    down by the cap, those of its wrong result), whatever the tokenizer merged around them."""
    item = _item(tok, "e", "error", text, "1")
    ids, decoded = item["response_token_ids"], item["response_text"]
    for cap, want in ((0.5, marked), (None, wrong_part)):
        if cap is None:  # the cap admits the wrong result but not the whole equation
            n_eq = len(tok.encode(marked, add_special_tokens=False))
            cap = (n_eq - 1) / len(ids)
        (row,) = annotate_rows(AnnotateConfig(backend="equations", coverage_cap=cap), [item],
                               tok, progress=False)
        assert row["status"] == "ok", row
        (s,) = row["spans"]
        assert decoded[s["char_start"]:s["char_end"]] == want
        assert s["label"].endswith(says), s["label"]
        covered = tok.decode(ids[s["token_start"]:s["token_end"]])
        assert want in covered, (want, covered)
        # exactly the tokens whose characters overlap the marked ones (ASCII text: decoding
        # a prefix of the ids gives a prefix of the text)
        bounds = [len(tok.decode(ids[:i])) for i in range(len(ids) + 1)]
        overlapping = [i for i in range(len(ids))
                       if bounds[i] < s["char_end"] and s["char_start"] < bounds[i + 1]]
        assert (s["token_start"], s["token_end"]) == (overlapping[0], overlapping[-1] + 1)


# Issue 26 review: independent cases (a real first error late in the response, rounded
# values, negatives, currency, percent and its "a - p%" shorthand, remainders, chains, units,
# bullets, LaTeX dollars, mixed numbers and "5-10" ranges left unread).
REVIEW_CASES = Path(__file__).parent / "fixtures" / "equation_review_cases.jsonl"


def test_review_cases_mark_the_first_real_error_on_its_tokens(tok) -> None:
    """The first wrong equation is the case's, and on the error route its span covers exactly
    the tokens of those characters (ASCII responses: a decoded id prefix is a text prefix);
    a response with no wrong equation gets no span."""
    cases = [json.loads(line) for line in REVIEW_CASES.read_text().splitlines() if line.strip()]
    assert len(cases) >= 75
    for c in cases:
        item = _item(tok, "e", "error", c["text"], "1")
        ids, text = item["response_token_ids"], item["response_text"]
        assert _first_wrong(text) == c["first_error"], c
        (row,) = annotate_rows(AnnotateConfig(backend="equations", coverage_cap=1.0), [item],
                               tok, progress=False)
        if c["first_error"] is None:
            assert row["status"] == "no_spans", (c, row)
            continue
        (s,) = row["spans"]
        assert text[s["char_start"]:s["char_end"]] == c["first_error"], (c, s)
        assert c["first_error"] in tok.decode(ids[s["token_start"]:s["token_end"]])
        if text.isascii():
            bounds = [len(tok.decode(ids[:i])) for i in range(len(ids) + 1)]
            hit = [i for i in range(len(ids))
                   if bounds[i] < s["char_end"] and s["char_start"] < bounds[i + 1]]
            assert (s["token_start"], s["token_end"]) == (hit[0], hit[-1] + 1), (c, s)
