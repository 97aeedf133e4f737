"""The ``testbed`` verifier: exact integer match of the last \\boxed{} (the CPU arithmetic task)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trace_rl.stages.verifiers.base import CheckFn, Verdict, register_verifier
from trace_rl.stages.verifiers.config import VerifyConfig
from trace_rl.stages.verifiers.extract import final_region, find_boxed

# Digit-group separators and spacing that do not change an integer: "1,234", "1 234",
# "1{,}234", "1\,234", "1\!234", plus math delimiters around it.
_NOISE_RE = re.compile(r"\{,\}|\\[,!;: ]|[\s,$~]")
_INT_RE = re.compile(r"^[+-]?\d+$")


def normalize_integer(s: str) -> int | None:
    """``' 01,234 '`` -> 1234; None when ``s`` is not an integer."""
    s = _NOISE_RE.sub("", s)
    return int(s) if _INT_RE.match(s) else None


class BoxedIntegerChecker:
    """The last box must hold the reference integer."""

    def __init__(self, cfg: VerifyConfig) -> None:
        del cfg  # no options

    def __call__(self, response_text: str, reference: str, meta: Mapping[str, Any]) -> Verdict:
        ref = normalize_integer(reference)
        if ref is None:
            return Verdict("error", detail=f"reference {reference!r} is not an integer")
        region = final_region(response_text)
        boxes = find_boxed(region) if region is not None else []
        if not boxes:
            return Verdict("no_answer", detail="no \\boxed{} answer")
        content = boxes[-1].content
        value = normalize_integer(content)
        if value is None:
            return Verdict("ok", extracted_answer=content, detail="boxed answer is not an integer")
        return Verdict("ok", correct=value == ref, extracted_answer=str(value))


@register_verifier("testbed", isolate=False)
def make_testbed_checker(cfg: VerifyConfig) -> CheckFn:
    """Factory registered as ``testbed``."""
    return BoxedIntegerChecker(cfg)
