"""Verifiers: math (math-verify in worker processes), choice (GPQA letters), testbed (integers).

Real components throughout: math-verify itself, real spawned worker processes, real hangs.
The math pool is started once for the module (a worker start costs seconds).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pydantic
import pytest

from trace_rl.stages.verifiers import (
    Verdict,
    VerifierPool,
    VerifyConfig,
    get_verifier,
    verifier_names,
    verify_rows,
)
from trace_rl.stages.verifiers.choice import extract_choice
from trace_rl.stages.verifiers.extract import (
    cut_at_turn_end,
    explicit_statements,
    final_boxed_group,
    final_region,
    find_boxed,
    implicit_statement,
)
from trace_rl.stages.verifiers.math_verifier import MathChecker, answers_match, parse_reference
from trace_rl.stages.verifiers.normalize import (
    array_to_pmatrix,
    decimal_comma_variant,
    drop_thousands_separators,
    max_decimals,
)
from trace_rl.stages.verifiers.testbed import normalize_integer

CASES = Path(__file__).resolve().parents[2] / "shared" / "data" / "verifier_cases" / "cases.jsonl"
# A power tower: sympy grinds on 9^387420489 for minutes.
POWER_TOWER = r"The answer is $\boxed{9^{9^{9}}}$."
# Pure-Python sympy work far beyond any per-item timeout here: ~14 s on this 2-core machine
# (exponent 60 took 0.4 s, which a fast, idle CI machine finished inside the 1 s timeout).
PYTHON_LEVEL_SLOW = r"So we get $\boxed{(x+1)^{1000}}$."
PYTHON_LEVEL_SLOW_REF = "(x+2)^{1000}"


@pytest.fixture(scope="module")
def math_cfg() -> VerifyConfig:
    # A generous timeout: on a loaded 2-core box one hard case can take several seconds.
    return VerifyConfig(kind="math", workers=2, timeout_s=30.0)


@pytest.fixture(scope="module")
def math_pool(math_cfg: VerifyConfig):
    with VerifierPool(math_cfg) as pool:
        yield pool


def _items(pairs: list[tuple[str, str]]) -> list[dict]:
    return [
        {"rollout_id": f"r{i}", "response_text": resp, "answer": ref}
        for i, (resp, ref) in enumerate(pairs)
    ]


# ---------------------------------------------------------------- extraction / normalisation


def test_final_region_skips_thinking_and_flags_truncation() -> None:
    assert (
        final_region("<think>\ntry \\boxed{1}\n</think>\n\nSo \\boxed{2}.") == "\n\nSo \\boxed{2}."
    )
    assert final_region("<think>\nstill thinking about \\boxed{1}") is None
    assert final_region("No tags: \\boxed{3}") == "No tags: \\boxed{3}"


def test_find_boxed_handles_nesting_escapes_and_variants() -> None:
    text = r"a \boxed{\frac{1}{2}} b \boxed{\{1\pm\sqrt{5},-2\}} c \fbox{7} d \boxed 5 e \boxed{185\}$."
    assert [b.content for b in find_boxed(text)] == [
        r"\frac{1}{2}",
        r"\{1\pm\sqrt{5},-2\}",
        "7",
        "5",
        "185\\",
    ]
    assert find_boxed(r"cut off \boxed{\frac{1}{") == []


def test_final_boxed_group_joins_only_adjacent_boxes() -> None:
    near = r"x = \boxed{3}. Roots: \boxed{1} and \boxed{2}"
    assert [b.content for b in final_boxed_group(near)] == ["3", "1", "2"]
    far = r"First \boxed{3}." + " filler" * 20 + r" Roots: \boxed{1} and \boxed{2}"
    assert [b.content for b in final_boxed_group(far)] == ["1", "2"]
    blank = "First \\boxed{3}.\n\nRoots: \\boxed{1}"
    assert [b.content for b in final_boxed_group(blank)] == ["1"]


def test_number_normalisation_rules() -> None:
    assert drop_thousands_separators("1 000") == "1000"
    assert drop_thousands_separators(r"11,\!111,\!100") == "11111100"
    assert drop_thousands_separators("-7{,}425{,}000.5") == "-7425000.5"
    assert drop_thousands_separators("32, 349") == "32, 349"  # a list, not a number
    assert drop_thousands_separators("0,111") == "0,111"  # decimal comma
    assert decimal_comma_variant("1000,99") == "1000.99"
    assert decimal_comma_variant("1,000") is None
    assert decimal_comma_variant("1, 2") is None
    assert max_decimals(r"(0.6, 2.6667]") == 4
    assert max_decimals("12") == 0
    got = array_to_pmatrix(r"\left[\begin{array}{cc}1 & 2 \\3 & 4\end{array}\right]")
    assert got == r"\begin{pmatrix}1 & 2 \\3 & 4\end{pmatrix}"


# ---------------------------------------------------------------- math, in process


def test_reference_parsed_once_per_distinct_answer() -> None:
    checker = MathChecker(VerifyConfig(kind="math", workers=1))
    verdicts = [
        checker(f"So $\\boxed{{{a}}}$.", ref, {})
        for a, ref in [("7", "7"), ("8", "7"), ("7.0", "7"), ("1/2", r"\frac12")]
    ]
    assert [v.correct for v in verdicts] == [True, False, True, True]
    assert checker.reference_parses == 2


def test_rounded_decimal_rule() -> None:
    third = parse_reference(r"\frac{1}{3}")
    assert answers_match(third, parse_reference("0.333"), "0.333", 2)
    assert not answers_match(third, parse_reference("0.3"), "0.3", 2)  # too few decimals shown
    assert not answers_match(third, parse_reference("0.333"), "0.333", None)  # rule off
    inexact = parse_reference("0.3312")  # a decimal reference keeps its own precision
    assert not answers_match(inexact, parse_reference("0.33"), "0.33", 2)


def test_unparsable_reference_is_an_error_never_a_reward() -> None:
    checker = MathChecker(VerifyConfig(kind="math", workers=1))
    for ref in [r"\frac{", "???", "", "}{"]:
        verdict = checker(r"The answer is $\boxed{\frac{}$ or \boxed{???}", ref, {})
        assert verdict.status == "error" and not verdict.correct, ref


# ---------------------------------------------------------------- stated answers only


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
    holds the reference, 7, many times; from the first word on each one has no answer."""
    working = (
        "We need 3 + 4. Adding the units, 3 + 4 = 7, and 7 - 0 = 7 as a check. "
        "Doubling gives 14 and halving 14 gives 7 again.\n\n"
        "Writing it as $\\frac{14}{2} = 7$ confirms it.\n"
    )
    full = working + "So the answer is $\\boxed{7}$."
    assert checker(full, "7", {}).correct
    for cut in range(len(working) + 1):
        verdict = checker(full[:cut], "7", {})
        assert not verdict.correct, (cut, full[:cut], verdict)
        # "W" alone is a one-symbol response, read as the answer "W" (wrong, not rewarded).
        assert verdict.status == "no_answer" or cut < 2, (cut, full[:cut], verdict)


# ---------------------------------------------------------------- math, through the pool


def test_math_realistic_responses(math_cfg: VerifyConfig, math_pool: VerifierPool) -> None:
    thinking = (
        "<think>\nLet me add 3 and 4. Hmm, is it \\boxed{12}? No, that is the product.\n"
        "</think>\n\nAdding, $3 + 4 = 7$, so the answer is $\\boxed{7}$."
    )
    cases = [
        (thinking, "7", "ok", True),
        (thinking, "12", "ok", False),  # the box inside the thinking does not count
        ("<think>\nLet me see, 2 + 2 equals", "4", "no_answer", False),
        ("Each side is 5, so the perimeter is 20.", "20", "ok", True),
        ("The probability is $\\boxed{\\dfrac{1}{2}}$.", "0.5", "ok", True),
        ("So there are $\\boxed{12\\,345}$ ways.", "12345", "ok", True),
        ("The angle is $\\boxed{90^\\circ}$.", "90", "ok", True),
        ("The discount is $\\boxed{25\\%}$.", "25", "ok", True),
        ("She pays $\\boxed{\\$1,250.50}$ in total.", "1250.5", "ok", True),
        ("The roots are $\\boxed{2}$ and $\\boxed{-3}$.", "-3, 2", "ok", True),
        (
            "The solution set is $\\boxed{(-\\infty, 1] \\cup (3, \\infty)}$.",
            "(-\\infty,1]\\cup(3,\\infty)",
            "ok",
            True,
        ),
        (
            "First half gives $\\boxed{200}$. Then we add 255. "
            + "Final Answer: The final answer is $455$. I hope it is correct.",
            "455",
            "ok",
            True,
        ),
        ("Therefore $x = \\boxed{8}$.", "7", "ok", False),
        ("Hence $\\boxed{\\frac{}$", "\\frac{", "error", False),
    ]
    rows = verify_rows(math_cfg, _items([(r, a) for r, a, _, _ in cases]), pool=math_pool)
    assert [r["rollout_id"] for r in rows] == [f"r{i}" for i in range(len(cases))]
    for row, (resp, ref, status, correct) in zip(rows, cases, strict=True):
        assert (row["status"], row["correct"]) == (status, correct), (resp, ref, row)
        assert row["reward"] == (1.0 if correct else 0.0)
    assert rows[0]["extracted_answer"] == "7"
    assert rows[3]["detail"] == "answer from the concluding sentence"


def test_math_from_a_non_main_thread(math_cfg: VerifyConfig, math_pool: VerifierPool) -> None:
    """Prefect runs tasks in threads, where math-verify's own signal-based timeouts fail."""
    from concurrent.futures import ThreadPoolExecutor

    items = _items([("$\\boxed{\\sqrt{8}}$", "2\\sqrt{2}"), ("$\\boxed{3}$", "4")])
    with ThreadPoolExecutor(1) as ex:
        rows = ex.submit(verify_rows, math_cfg, items, math_pool).result()
    assert [(r["status"], r["correct"]) for r in rows] == [("ok", True), ("ok", False)]


def test_case_agreement(math_cfg: VerifyConfig, math_pool: VerifierPool) -> None:
    """Agreement with the expected verdicts of the 298 unflagged peer test cases."""
    if not CASES.exists():
        pytest.skip(f"verifier cases not found at {CASES}")
    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    cases = [c for c in cases if not c["flags"]]
    assert len(cases) == 298
    items = [
        {
            "rollout_id": c["id"],
            "answer": c["gold"],
            "response_text": c["pred"]
            if c["needs_extraction"]
            else f"The final answer is $\\boxed{{{c['pred']}}}$.",
        }
        for c in cases
    ]
    t0 = time.perf_counter()
    rows = verify_rows(math_cfg, items, pool=math_pool)
    elapsed = time.perf_counter() - t0
    wrong = [(c, r) for c, r in zip(cases, rows, strict=True) if r["correct"] != c["equal"]]
    rate = 1 - len(wrong) / len(cases)
    print(
        f"\nmath verifier agreement: {len(cases) - len(wrong)}/{len(cases)} = {rate:.1%} "
        f"({len(cases) / elapsed:.1f} cases/s, {math_cfg.workers} workers)"
    )
    for c, r in wrong:
        print(
            f"  {c['id']} expected equal={c['equal']} got {r['status']}/{r['correct']}: "
            f"gold={c['gold'][:60]!r} pred={c['pred'][:60]!r}"
        )
    assert rate >= 0.97


def test_hangs_become_timeouts_and_the_batch_goes_on() -> None:
    cfg = VerifyConfig(kind="math", workers=1, timeout_s=1.0, kill_grace_s=1.0, chunk_size=8)
    items = _items(
        [
            ("$\\boxed{5}$", "5"),
            (PYTHON_LEVEL_SLOW, PYTHON_LEVEL_SLOW_REF),
            (POWER_TOWER, "3"),
            ("$\\boxed{4}$", "5"),
            ("$\\boxed{6}$", "6"),
        ]
    )
    with VerifierPool(cfg) as pool:
        t0 = time.perf_counter()
        rows = verify_rows(cfg, items, pool=pool)
        elapsed = time.perf_counter() - t0
        assert [r["status"] for r in rows] == ["ok", "timeout", "timeout", "ok", "ok"]
        assert [r["correct"] for r in rows] == [True, False, False, False, True]
        assert all("longer than 1s" in rows[i]["detail"] for i in (1, 2))
        assert pool.kills == 0  # the in-worker alarm was enough
        assert elapsed < 10.0  # two 1 s timeouts, not minutes of sympy


def test_a_stuck_worker_is_killed_and_replaced() -> None:
    """A worker that stops responding (here: SIGSTOP, as a process stuck in C code would)
    is killed at timeout_s + kill_grace_s; its item times out, the rest are redone."""
    cfg = VerifyConfig(kind="math", workers=1, timeout_s=1.0, kill_grace_s=1.0, chunk_size=8)
    items = _items(
        [(PYTHON_LEVEL_SLOW, PYTHON_LEVEL_SLOW_REF), ("$\\boxed{4}$", "4"), ("$\\boxed{6}$", "7")]
    )
    with VerifierPool(cfg) as pool:
        first_pid = pool.worker_pids()[0]
        freezer = threading.Timer(0.4, os.kill, args=(first_pid, signal.SIGSTOP))
        freezer.start()
        rows = verify_rows(cfg, items, pool=pool)
        freezer.join()
        assert [(r["status"], r["correct"]) for r in rows] == [
            ("timeout", False),
            ("ok", True),
            ("ok", False),
        ]
        assert "worker killed" in rows[0]["detail"]
        assert pool.kills == 1 and pool.worker_pids()[0] != first_pid
        again = verify_rows(cfg, _items([("$\\boxed{2}$", "2")]), pool=pool)
        assert again[0]["correct"] is True  # the replacement serves later batches


def test_a_dying_worker_costs_one_error_row() -> None:
    cfg = VerifyConfig(kind="math", workers=1, timeout_s=60.0, chunk_size=8)
    items = _items([(POWER_TOWER, "3"), ("$\\boxed{6}$", "6")])
    with VerifierPool(cfg) as pool:
        pid = pool.worker_pids()[0]
        killer = threading.Timer(1.0, os.kill, args=(pid, signal.SIGKILL))
        killer.start()
        rows = verify_rows(cfg, items, pool=pool)
        killer.join()
    assert rows[0]["status"] == "error" and "died" in rows[0]["detail"]
    assert rows[1]["status"] == "ok" and rows[1]["correct"] is True
    assert pool.deaths == 1


def test_verify_rows_starts_its_own_pool_and_keeps_every_row() -> None:
    cfg = VerifyConfig(kind="math", workers=1)
    items = _items([("$\\boxed{3}$", "3"), ("no answer here at all", "3"), ("$\\boxed{3}$", "")])
    items.append({"rollout_id": "r3", "response_text": None, "answer": None, "meta": "{bad"})
    rows = verify_rows(cfg, items)
    assert [r["rollout_id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert [r["status"] for r in rows] == ["ok", "no_answer", "error", "error"]
    assert [r["reward"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert set(rows[0]) == {
        "rollout_id",
        "reward",
        "correct",
        "extracted_answer",
        "status",
        "detail",
    }
    with pytest.raises(ValueError, match="lacks \\['answer'\\]"):
        verify_rows(cfg, [{"rollout_id": "x", "response_text": "1"}])


# ---------------------------------------------------------------- choice


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("Comparing the spin multiplicities, the right option is $\\boxed{C}$.", "C"),
        ("Options A and D violate parity, so the answer is (B).", "B"),
        ("The ester hydrolyses first.\n\nAnswer: D", "D"),
        ("**Answer:** (A)", "A"),
        ("I pick B. A careful recount of the electrons agrees.", "B"),
        ("Therefore $\\boxed{\\text{(D)}}$", "D"),
        ("<think>\nMaybe A? No.\n</think>\n\nThe answer is C) 4.2 eV", "C"),
        ("the answer is: option b", None),
        ("I am not sure about this one.", None),
    ],
)
def test_extract_choice(response: str, letter: str | None) -> None:
    region = final_region(response)
    assert region is not None
    assert extract_choice(region) == letter


def test_choice_verifier_rows() -> None:
    cfg = VerifyConfig(kind="choice", workers=1)
    rows = verify_rows(
        cfg,
        _items(
            [
                ("The answer is (C).", "c"),
                ("The answer is (C).", "B"),
                ("I cannot decide.", "A"),
                ("The answer is (C).", "E"),
                ("<think>\nThe answer is probably (B)", "B"),
            ]
        ),
    )
    assert [(r["status"], r["correct"]) for r in rows] == [
        ("ok", True),
        ("ok", False),
        ("no_answer", False),
        ("error", False),
        ("no_answer", False),
    ]
    assert rows[0]["extracted_answer"] == "C"


# ---------------------------------------------------------------- testbed


def test_testbed_verifier_rows() -> None:
    assert normalize_integer(" 01,234 ") == 1234
    assert normalize_integer("-0") == 0
    assert normalize_integer("12.5") is None
    cfg = VerifyConfig(kind="testbed", workers=1)
    steps = "Step 1: 7 + 5 = 12, write 2 carry 1.\nStep 2: 3 + 8 + 1 = 12.\n"
    rows = verify_rows(
        cfg,
        _items(
            [
                (steps + "\\boxed{122}", "122"),
                (steps + "\\boxed{1,234}", "1234"),
                (steps + "\\boxed{0042}", "42"),
                ("\\boxed{5} then \\boxed{7}", "7"),
                (steps + "\\boxed{121}", "122"),
                (steps + "\\boxed{12.5}", "122"),
                (steps, "122"),
                ("\\boxed{7}", "seven"),
            ]
        ),
    )
    assert [(r["status"], r["correct"]) for r in rows] == [
        ("ok", True),
        ("ok", True),
        ("ok", True),
        ("ok", True),
        ("ok", False),
        ("ok", False),
        ("no_answer", False),
        ("error", False),
    ]
    assert rows[2]["extracted_answer"] == "42"


# ---------------------------------------------------------------- registry and config


def test_registry_and_config_errors_list_valid_choices() -> None:
    assert verifier_names() == ["choice", "math", "testbed"]
    assert get_verifier("math").isolate and not get_verifier("testbed").isolate
    with pytest.raises(ValueError, match="valid kinds: choice, math, testbed"):
        get_verifier("maths")
    with pytest.raises(pydantic.ValidationError, match="valid kinds: choice, math, testbed"):
        VerifyConfig(kind="gpqa")
    with pytest.raises(pydantic.ValidationError, match="must be > 0"):
        VerifyConfig(timeout_s=0)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        VerifyConfig(timout_s=3)
    with pytest.raises(ValueError, match="cannot be correct"):
        Verdict("timeout", correct=True)
