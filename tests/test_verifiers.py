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

import pydantic
import pytest
from conftest import SHARED_DATA
from trace_rl.stages.verifiers import (
    Verdict,
    VerifierPool,
    VerifyConfig,
    get_verifier,
    verifier_names,
    verify_rows,
)
from trace_rl.stages.verifiers.extract import (
    final_boxed_group,
    final_region,
    find_boxed,
)
from trace_rl.stages.verifiers.math_verifier import MathChecker, answers_match, parse_reference
from trace_rl.stages.verifiers.normalize import (
    array_to_pmatrix,
    decimal_comma_variant,
    drop_thousands_separators,
    max_decimals,
)

CASES = SHARED_DATA / "verifier_cases" / "cases.jsonl"  # $TRACE_SHARED_DATA, as for every data test
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
