"""The ``testbed`` verifier: the testbed's own grading (`testbed.task.grade`: exact integer match
of the last \\boxed{}), so the reward is what the testbed build reports as accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trace_rl.stages.verifiers.registry import CheckFn, Verdict, register_verifier
from trace_rl.stages.verifiers.config import VerifyConfig
from trace_rl.testbed.task import grade, normalize_integer

__all__ = ["make_testbed_checker", "normalize_integer"]


def _check(response_text: str, reference: str, meta: Mapping[str, Any]) -> Verdict:
    g = grade(response_text, reference)
    return Verdict(g.status, correct=g.correct, extracted_answer=g.extracted, detail=g.detail)


@register_verifier("testbed", isolate=False)
def make_testbed_checker(cfg: VerifyConfig) -> CheckFn:
    """Factory registered as ``testbed`` (no options)."""
    del cfg
    return _check
