"""The `equations` annotator (stages/annotators/equations.py): arithmetic checked, no model.

Responses are word-problem answers like SmolLM2's (docs/real_model.md quotes real ones); the
tokenizer is a tiny byte-level BPE (tests/tiny.py), so spans go through the same alignment as
every annotator's.
"""

from __future__ import annotations

import random
from fractions import Fraction

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
        assert (r["coverage"] is None) == (r["status"] == "skipped")  # NULL: not annotated
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
    assert row["status"] == "too_broad" and row["spans"] == [] and row["coverage"] == 0.0
