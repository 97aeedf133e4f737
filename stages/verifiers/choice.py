"""The ``choice`` verifier (GPQA-style multiple choice): the picked letter vs the reference."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trace_rl.stages.verifiers.registry import CheckFn, Verdict, register_verifier
from trace_rl.stages.verifiers.config import VerifyConfig
from trace_rl.stages.verifiers.extract import final_boxed_group, final_region

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textnormal)\s*\{([^{}]*)\}")


def _letter_in(s: str, letters: str) -> str | None:
    """The letter ``s`` names when it is just a choice: ``'C'``, ``'(C)'``, ``'\\text{C}'``,
    ``'C) 42 kJ'``, ``'C. 42'``; None otherwise."""
    s = _TEXT_WRAP_RE.sub(r"\1", s).replace("$", "").strip().strip("*").strip()
    m = re.match(rf"^\(?([{letters}])\)?(?:$|[.):]|\s)", s)
    return m.group(1) if m else None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a response picks, or None.

    In order: the last \\boxed{}; the last "answer is (C)" / "Answer: C" statement; the last
    parenthesised "(C)"; the last standalone capital letter that is not the article "A".
    """
    boxes = final_boxed_group(text)
    if boxes:
        letter = _letter_in(boxes[-1].content, letters)
        if letter is not None:
            return letter
    patterns = (
        rf"answer\s*(?:is|:)?\s*(?:option|choice)?\s*[:\-]?\s*[*$\\(\s]*\(?([{letters}])\b",
        rf"\(([{letters}])\)",
        rf"(?<![A-Za-z0-9\\])([{letters}])(?![A-Za-z0-9])(?! [a-z])",
    )
    for i, pattern in enumerate(patterns):
        flags = re.IGNORECASE if i == 0 else 0
        hits = [m.group(1) for m in re.finditer(pattern, text, flags)]
        # Only the first pattern matches case-insensitively, and then only the word "answer":
        # the letter itself must be upper case.
        hits = [h for h in hits if h in letters]
        if hits:
            return hits[-1]
    return None


def reference_letter(reference: str, letters: str) -> str | None:
    """The reference as one option letter (``'C'``, ``' (c) '``), or None if it is not one."""
    ref = reference.strip().strip("()").strip().upper()
    return ref if len(ref) == 1 and ref in letters else None


class ChoiceChecker:
    """Compares the picked letter with the reference letter."""

    def __init__(self, cfg: VerifyConfig) -> None:
        self.letters = cfg.choice_letters

    def __call__(self, response_text: str, reference: str, meta: Mapping[str, Any]) -> Verdict:
        ref = reference_letter(reference, self.letters)
        if ref is None:
            return Verdict(
                "error",
                detail=f"reference {reference!r} is not one of the letters {self.letters}",
            )
        region = final_region(response_text)
        if region is None:
            return Verdict("no_answer", detail="thinking never closed (response cut off?)")
        picked = extract_choice(region, self.letters)
        if picked is None:
            return Verdict("no_answer", detail=f"no option letter ({self.letters}) found")
        return Verdict("ok", correct=picked == ref, extracted_answer=picked)


@register_verifier("choice", isolate=False)
def make_choice_checker(cfg: VerifyConfig) -> CheckFn:
    """Factory registered as ``choice``."""
    return ChoiceChecker(cfg)
