"""The math verifier rewards only an answer the response states (issue: no reward without an
answer): what counts as a statement, and near misses that must never be rewarded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sympy

from trace_rl.stages.verifiers import VerifyConfig
from trace_rl.stages.verifiers.extract import cut_at_turn_end, explicit_statements, implicit_statement
from trace_rl.stages.verifiers.math_verifier import MathChecker


def test_explicit_statements_in_order() -> None:
    text = (
        "First $\\boxed{5}$.\n\nThe answer is 6.\nAnswer: 7\n#### 1,234\nI hope the answer is right."
    )
    got = [(st.kind, st.text) for st in explicit_statements(text)]
    assert got == [
        ("boxed", "\\boxed{5}"),
        ("answer_phrase", "6"),
        ("answer_phrase", "7"),  # "Answer: 7" is both a phrase and a line
        ("answer_line", "7"),
        ("gsm8k", "1,234"),
        ("answer_phrase", "right"),  # states nothing math-verify parses: skipped by the checker
    ]
    # A period or line break inside math does not end the statement.
    (st,) = explicit_statements("So the answer is:\n\n\\[ x = 1.5\n \\]. Done.")
    assert st.text == "\\[ x = 1.5\n \\]"
    assert explicit_statements("Here is the solution: 1 + 2 = 3.") == []


def test_implicit_statement_needs_a_finished_concluding_sentence() -> None:
    def implicit(text: str) -> tuple[str, str] | None:
        st = implicit_statement(text)
        return None if st is None else (st.kind, st.text)

    assert implicit("Each side is 5, so the perimeter is 20.") == (
        "conclusion",
        "so the perimeter is 20.",
    )
    assert implicit("Thus $x = 2$. I hope it is correct.") == ("conclusion", "Thus $x = 2$.")
    assert implicit("The identity is $I$.") == ("closing_value", "$I$")
    assert implicit(" $004$ ") == ("whole", "$004$")
    assert implicit("4, 10, -2") == ("whole", "4, 10, -2")
    assert implicit("Let me compute 1 + 2 and then I run out of") is None  # cut off
    assert implicit("Thus 1 + 2 = 3. Then we need to compute the") is None  # cut off
    assert implicit("There are 3 apples and 4 pears.") is None  # no conclusion
    assert implicit("Therefore we are done.") is None  # nothing to verify
    assert implicit("x = 1\ny = 2") is None  # several lines of bare math are working
    assert cut_at_turn_end("So $3$.<|im_end|>\nuser: So $4$.") == "So $3$."


@pytest.fixture(scope="module")
def checker() -> MathChecker:
    return MathChecker(VerifyConfig(kind="math", workers=1))


@pytest.mark.parametrize(
    ("response", "ref", "status", "correct"),
    [
        # Truncated or unstated: the reference appears in the prose but is never stated.
        ("Let me compute 1 + 2 and then I run out of", "3", "no_answer", False),
        ("Let me compute $1 + 2$ and then I", "3", "no_answer", False),
        ("Each side is 5, so the perimeter is 20. Next we need to", "20", "no_answer", False),
        ("Natalia sold 48/2 = 24 clips in May and then", "24", "no_answer", False),
        ("There are 3 apples and 4 pears.", "3", "no_answer", False),
        ("The result is 1 + 2", "3", "no_answer", False),
        # An empty box states nothing.
        ("So the answer is $\\boxed{}$.", "3", "no_answer", False),
        ("$\\boxed{ }$", "3", "no_answer", False),
        # The LAST stated answer counts, whatever the kind of statement.
        ("First draft: $\\boxed{5}$.\n\nOn reflection the final answer is $6$.", "5", "ok", False),
        ("First draft: $\\boxed{5}$.\n\nOn reflection the final answer is $6$.", "6", "ok", True),
        ("The answer is 5.\n\nWait: 2 + 4 = 6, so the answer is 6.", "5", "ok", False),
        ("The answer is 5? No: 2 + 4 = 6.\n\n$\\boxed{6}$", "6", "ok", True),
        ("The answer is $\\boxed{7}$. I hope the answer is correct.", "7", "ok", True),
        # Answer-is phrasing and answer lines.
        ("The final answer is 42. I hope it is correct.", "42", "ok", True),
        ("Adding 40 and 2.\n\nAnswer: 12", "42", "ok", False),
        ("**Answer:** $\\frac{1}{2}$", "0.5", "ok", True),
        ("Thus, the answer is:\n\n\\[ 189 \\]", "189", "ok", True),
        # GSM8K: the #### line, not the intermediate numbers.
        ("She sold 48/2 = 24 in May, 48 + 24 = 72 in all.\n#### 72", "72", "ok", True),
        ("She sold 48/2 = 24 in May, 48 + 24 = 72 in all.\n#### 72", "24", "ok", False),
        ("So 1000 + 234 = 1234.\n#### 1,234", "1234", "ok", True),
        # Nothing after an end-of-turn token is part of the response.
        ("The answer is 3.<|im_end|>\nThe answer is 4.", "3", "ok", True),
        ("Let me see: 1 + 2<|im_end|>\nThe answer is 3.", "3", "no_answer", False),
        # Implicit statements.
        ("$004$", "4", "ok", True),
        ("Therefore $x \\geq 5$ is the solution.", "x \\geq 5", "ok", True),
        (
            "The identity matrix is $\\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix}$.",
            "\\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix}",
            "ok",
            True,
        ),
    ],
)
def test_only_a_stated_answer_is_verified(
    checker: MathChecker, response: str, ref: str, status: str, correct: bool
) -> None:
    verdict = checker(response, ref, {})
    assert (verdict.status, verdict.correct) == (status, correct), verdict
    if status == "no_answer":
        assert verdict.extracted_answer is None and "no stated answer" in (verdict.detail or "")


def test_a_response_cut_before_its_answer_is_never_rewarded(checker: MathChecker) -> None:
    """Property: no prefix ending before the answer statement is rewarded, though the working
    holds the reference, 7, many times; from the first word on each one has no answer. (A
    response that *ended* on "... 3 + 4 = 7, and 7 - 0 = 7 as a check." states 7 by its
    result sentence; one cut there by the token limit does not.)"""
    working = (
        "We need 3 + 4. Adding the units, 3 + 4 = 7, and 7 - 0 = 7 as a check. "
        "Doubling gives 14 and halving 14 gives 7 again.\n\n"
        "Writing it as $\\frac{14}{2} = 7$ confirms it.\n"
    )
    full = working + "So the answer is $\\boxed{7}$."
    assert checker(full, "7", {}).correct
    cut_off = {"finish_reason": "length"}  # what the rollout says about a response cut short
    for cut in range(len(working) + 1):
        verdict = checker(full[:cut], "7", cut_off)
        assert not verdict.correct, (cut, full[:cut], verdict)
        # "W" alone is a one-symbol response, read as the answer "W" (wrong, not rewarded).
        assert verdict.status == "no_answer" or cut < 2, (cut, full[:cut], verdict)


# Issue 20: an "answer is" statement is graded by the first complete value it states. Each
# response is checked against the value it states (rewarded) and a decoy from its own text
# (not rewarded); hedges are rewarded for no value.
@pytest.mark.parametrize(
    ("response", "stated", "decoy"),
    [
        ("The answer is 40 (from 8 x 5).", "40", "5"),
        ("The answer is 15 dollars for 2 hours.", "15", "2"),
        ("The answer is 4, not 5.", "4", "5"),
        ("The final answer is 9 because 3 + 4 = 7.", "9", "7"),
        ("The answer is $1,200 a month for 3 months.", "1200", "3"),
        ("The answer is 25% of the 80 apples = 20 apples.", "20", "25"),  # issue 26: states 20
        ("Answer: 8 x 5 = 40 stickers", "40", "5"),
        ("The answer is 18 - 6 = 12 marbles, 2 more than Tom.", "12", "2"),
        ("The answer is $40$ (from $8 \\times 5$).", "40", "5"),
        ("The answer is $16,\\!386.20$ after 5 years.", "16386.20", "5"),
        ("The answer is about 12 kilometres in 3 hours.", "12", "3"),
        # The last statement counts.
        ("The answer is 5.\nWait, 2 + 4 = 6. The answer is 6 (2 + 4).", "6", "5"),
        # A plain-text result sentence: what small models write instead of "The answer is N".
        ("Sam had 18 marbles and gave 6 away. Sam has 18 - 6 = 12 marbles now.", "12", "6"),
        ("Anna buys 3 * 4 = 12 cookies, then 12 + 5 = 17 cookies in all.", "17", "12"),
        ("Tom buys 4 bags of cookies * 4 cookies per bag = 16 cookies.", "16", "4"),
        ("Yuki has 13 + 7 = 20 apples. Yuki now has 20 apples.", "20", "13"),
    ],
)
def test_a_statement_is_graded_by_the_value_it_states(
    checker: MathChecker, response: str, stated: str, decoy: str
) -> None:
    good, bad = checker(response, stated, {}), checker(response, decoy, {})
    assert (good.status, good.correct) == ("ok", True), good
    assert (bad.status, bad.correct) == ("ok", False), bad


@pytest.mark.parametrize(
    "response",
    [
        "The answer is 12 or maybe 13 or 14 or 15.",
        "The answer is 12 or 13.",
        "The answer is 12 marbles or maybe 13.",
        "The answer is either 6 or 7.",
        "The answer is between 2 and 3 hours.",
        "The answer is 2 to 3.",
        "The answer is 2-3.",
        "The answer is $5$ or $6$.",
        "The answer is 7.\nHmm, the answer is 6 or 7.",  # a hedge last withdraws the firm 7
    ],
)
def test_a_hedge_earns_nothing(checker: MathChecker, response: str) -> None:
    """A hedge states no single value: ``no_answer`` for every value it names (module
    docstring of stated.py says why not ``wrong``)."""
    for value in ("2", "3", "5", "6", "7", "12", "13", "15"):
        verdict = checker(response, value, {})
        assert verdict.status == "no_answer" and not verdict.correct, (value, verdict)
        assert "hedges between values" in (verdict.detail or "")


def test_non_numeric_statements_keep_the_whole_statement(checker: MathChecker) -> None:
    """What does not open with a plain number is read by math-verify as before."""
    assert checker("The answer is 3x + 2.", "3x+2", {}).correct
    assert checker("The answer is $\\frac{1}{2}$ of the pie.", "0.5", {}).correct
    assert checker("The answer is $2\\sqrt{3}$.", "2\\sqrt{3}", {}).correct
    assert checker("The answer is 4,5.", "4.5", {}).correct  # decimal comma, not a list
    assert checker("The answer is 1,234.", "1234", {}).correct


def test_a_result_sentence_counts_only_when_the_response_ended(checker: MathChecker) -> None:
    text = "Sam has 18 - 6 = 12 marbles now."
    assert checker(text, "12", {"finish_reason": "stop"}).correct
    cut = checker(text, "12", {"finish_reason": "length"})
    assert cut.status == "no_answer", cut
    single = "Yuki now has 20 apples."
    assert checker(single, "20", {"finish_reason": "stop"}).correct
    assert checker(single, "20", {"finish_reason": "length"}).status == "no_answer"
    # Two numbers and no arithmetic: still no statement.
    assert checker("There are 3 apples and 4 pears.", "4", {}).status == "no_answer"
    assert checker("Maria gives 10 apples away, and 5 of them are left.", "5", {}).status == "no_answer"


# Issue 26: prose statements that must not be rewarded (negation, retraction, sign words,
# bounds, compound quantities, percentages, hedges, questions), and ordinary ones that must.
CASES = Path(__file__).parent / "fixtures" / "stated_answer_cases.jsonl"
# Misses allowed on the ordinary statements (there are none today; a regex change that loses
# a few is to be looked at, one that rewards a wrong answer is refused outright).
MAX_FALSE_NEGATIVES = 2


def test_prose_cases_reward_no_wrong_answer(checker: MathChecker) -> None:
    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    assert len(cases) >= 100 and {c["class"] for c in cases} >= {
        "negation", "retraction", "sign", "bound", "approximate", "compound", "percent", "hedge",
        "plain"}
    false_pos, false_neg = [], []
    for c in cases:
        verdict = checker(c["text"], c["gold"], {})
        if c["expect"] == "correct" and not verdict.correct:
            false_neg.append((c, verdict))
        elif c["expect"] != "correct" and verdict.correct:
            false_pos.append((c, verdict))
        elif c["expect"] == "no_answer":  # unclear or hedged: no answer at all, not a wrong one
            assert verdict.status == "no_answer", (c, verdict)
    assert false_pos == []
    assert len(false_neg) <= MAX_FALSE_NEGATIVES, false_neg


@pytest.mark.parametrize(
    ("template", "reads_as"),
    [
        ("The answer is not {n}.", None),
        ("The answer is {n}. But that is wrong.", None),
        ("I don't think the answer is {n}.", None),
        ("The answer is at least {n}.", None),
        ("The answer is {n} or more.", None),
        ("Sam has more than {n} apples.", None),
        ("The answer is {n} hours {m} minutes.", None),
        ("The answer is {n} (or {m}).", None),
        ("The answer is {n}?", None),
        ("The answer is {n}% of {m}.", None),
        ("The answer is negative {n}.", "-{n}"),
        ("The answer is {n} thousand dollars.", "{n}000"),
        ("The answer is {n} 1/2.", "{n} + 1/2"),
        ("The answer is {m}% of {n} = {n} apples.", "{n}"),
        ("The answer is approximately {n} km.", "{n}"),
    ],
)
def test_property_a_cue_never_pays_the_bare_number(
    checker: MathChecker, template: str, reads_as: str | None
) -> None:
    """Property over random numbers: a statement with one of the cues is never rewarded for
    the bare number it contains (unless the cue does not change it, "approximately"); where
    the cue is read whole, the whole value is rewarded; otherwise nothing is."""
    rng = random.Random(template)
    for _ in range(15):
        n, m = rng.randint(2, 999), rng.randint(2, 99)
        text = template.format(n=n, m=m)
        bare = checker(text, str(n), {})
        if reads_as is None:
            assert bare.status == "no_answer", (text, bare)
            continue
        whole = str(sympy.sympify(reads_as.format(n=n)))
        assert checker(text, whole, {}).correct, (text, whole)
        assert bare.correct == (whole == str(n)), (text, bare)


# Issue 26 review: a second, independent set of adversarial statements (negation after the
# value or the box, alternatives later in the sentence, operations in words, operands, unicode
# fractions, space-grouped thousands, bounds inside and after boxes, '####' lines, implicit
# sentences with symbols) and ordinary ones, incl. 28 written after the fixes as a hold-out.
# A case with ``known_limit`` is a documented miss (README of the fixture: the reason).
REVIEW_CASES = Path(__file__).parent / "fixtures" / "stated_answer_review_cases.jsonl"


def test_review_cases_reward_exactly_the_right_answers(checker: MathChecker) -> None:
    cases = [json.loads(line) for line in REVIEW_CASES.read_text().splitlines() if line.strip()]
    assert len(cases) >= 200
    limits = [c for c in cases if c.get("known_limit")]
    assert len(limits) <= 4, limits  # a new limit is a decision, not a drift
    wrong = []
    for c in cases:
        verdict = checker(c["text"], c["gold"], {})
        rewarded = verdict.status == "ok" and bool(verdict.correct)
        if c.get("known_limit"):
            continue
        if rewarded != (c["expect"] == "correct"):
            wrong.append((c["text"], c["gold"], c["expect"], verdict))
    assert wrong == []


@pytest.mark.parametrize("full", [
    "Adding them up gives the total. The answer is 125 apples.",
    "Adding them up gives the total.\nAnswer: 125",
    "Adding them up gives the total.\n#### 125",
    "Adding them up gives the total, so the answer is $\\boxed{125}$.",
    "Adding them up gives the total. The final answer is \\boxed{\\frac{125}{2}}.",
    "\\boxed{125}",
    "Adding them up gives the total. The answer is 12.5 meters.",
])
def test_a_response_cut_inside_its_answer_states_nothing(checker: MathChecker, full: str) -> None:
    """Property: a response cut by its token limit in the middle of its final answer ("... the
    answer is 12" of "125", "\\boxed{12" of "\\boxed{125}") is not rewarded for the part it
    wrote: what follows the cut is unknown. Graded against each value its prefix reads as."""
    cut_off = {"finish_reason": "length"}
    start = full.rfind("12")
    for cut in range(start + 1, len(full)):
        prefix = full[:cut]
        closed = prefix.endswith(("}", "$")) or (prefix.endswith(".") and not prefix[-2].isdigit())
        if closed and prefix.count("{") == prefix.count("}"):
            continue  # the answer is closed: complete, however the response goes on
        for gold in ("1", "12", "125", "\\frac{12}{2}", "\\frac{125}{2}"):
            verdict = checker(prefix, gold, cut_off)
            assert not verdict.correct, (prefix, gold, verdict)
    # The whole response, ended by the model, is read; cut right after a closed answer, too.
    whole = "\\frac{125}{2}" if "frac" in full else "12.5" if "12.5" in full else "125"
    assert checker(full, whole, {"finish_reason": "stop"}).correct
    assert checker(full, whole, cut_off).correct == full.endswith((".", "}"))


@pytest.mark.parametrize("response, gold, rewarded", [
    # Closed before the cut: a line break, a period and a space, a closed \( \) span.
    ("Adding them up.\nThe answer is 12.\n", "12", True),
    ("Adding them up.\nThe answer is 12. ", "12", True),
    ("Adding them up.\nAnswer: 12\n", "12", True),
    ("Adding them up.\n#### 12\n", "12", True),
    ("Adding them up. The answer is \\(12\\)", "12", True),
    # Cut inside a last answer that does not parse yet: the earlier answer it was going on to
    # restate or revise is not read in its place.
    ("So $\\boxed{12}$. But wait, we double counted, so the answer is $\\boxed{1", "12", False),
    ("So $\\boxed{12}$. But wait, we double counted, so the answer is $\\boxed{1", "1", False),
    ("We get $\\boxed{350}$. Another way: $200 + 2d = \\boxed{3", "350", False),
    ("We get $\\boxed{350}$. Another way: $200 + 2d = \\boxed{3", "3", False),
    ("The answer is 12. Actually, no: the answer is $\\frac{3}{4", "12", False),
])
def test_a_cut_response_is_read_up_to_its_last_answer(
    checker: MathChecker, response: str, gold: str, rewarded: bool
) -> None:
    """A cut response's last answer decides: closed before the cut, it is read (a line break or
    "12. " is no decimal point); cut inside, nothing is, not even an earlier closed answer
    (math500 solutions cut inside their second box: 48 of 2964 cuts read the first box)."""
    verdict = checker(response, gold, {"finish_reason": "length"})
    assert verdict.correct == rewarded, verdict
