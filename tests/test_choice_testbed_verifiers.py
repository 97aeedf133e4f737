"""The choice (GPQA letter) and testbed verifiers, through verify_rows."""

from __future__ import annotations

import pytest

from trace_rl.stages.verifiers import VerifyConfig, verify_rows
from trace_rl.stages.verifiers.choice import extract_choice
from trace_rl.stages.verifiers.extract import final_region
from trace_rl.stages.verifiers.testbed import normalize_integer


def _items(pairs: list[tuple[str, str]]) -> list[dict]:
    return [
        {"rollout_id": f"r{i}", "response_text": resp, "answer": ref}
        for i, (resp, ref) in enumerate(pairs)
    ]

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
