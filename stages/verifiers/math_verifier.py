"""The ``math`` verifier: final \\boxed{} answer vs the reference, compared by math-verify.

math-verify's own timeouts use ``signal.alarm``; they are switched off here
(``parsing_timeout=None``, ``timeout_seconds=None``) because the worker process that runs this
checker puts its own alarm around the whole item (stages/verifiers/pool.py), and math-verify
would cancel that alarm each time it set its own.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from trace_rl.stages.verifiers.base import CheckFn, Verdict, register_verifier
from trace_rl.stages.verifiers.config import VerifyConfig
from trace_rl.stages.verifiers.extract import final_boxed_group, final_region
from trace_rl.stages.verifiers.normalize import (
    clean_answer,
    decimal_comma_variant,
    has_math_delimiters,
    max_decimals,
)

# Parsed answers: math-verify returns [sympy object, source string] or [] when nothing parsed.
Parsed = list[Any]
_REF_CACHE_SIZE = 4096


# parse/verify run with math-verify's alarms off (see the module docstring); it warns about
# that on first use, which would only be noise in every worker's log.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse(text: str) -> Parsed:
    from math_verify import parse

    return parse(text, parsing_timeout=None)  # type: ignore[arg-type]


def _parse_with_variants(text: str, wrap: str) -> Parsed:
    """Parse ``wrap.format(text)``, adding the decimal-comma reading when there is one."""
    parsed = _parse(wrap.format(text))
    variant = decimal_comma_variant(text)
    if variant is not None:
        parsed = parsed + _parse(wrap.format(variant))
    return parsed


def parse_reference(reference: str) -> Parsed:
    """A reference answer as math-verify objects; [] when it cannot be parsed.

    A bare reference (``\\frac{1}{3}``) is wrapped in ``$...$`` so math-verify reads it as
    LaTeX rather than hunting for a number in it. When math-verify gets no sympy object out
    of it, only its raw string is left and answers are matched by string equality; that is
    kept for well-formed LaTeX it cannot model (``x = \\frac{1}{2}, x = 1 \\pm \\sqrt{3}``),
    but a malformed reference (``\\frac{``, ``???``) is unparsable: it would reward garbage.
    """
    ref = clean_answer(reference)
    if not ref:
        return []
    parsed = _parse_with_variants(ref, "${}$")
    if any(not isinstance(p, str) for p in parsed) or _well_formed(ref):
        return parsed
    return []


def _well_formed(text: str) -> bool:
    """Balanced braces (escaped ``\\{ \\}`` aside) and at least one letter or digit."""
    depth = 0
    for token in re.findall(r"\\.|[{}]", text):
        if token in "{}":
            depth += 1 if token == "{" else -1
            if depth < 0:
                return False
    return depth == 0 and any(ch.isalnum() for ch in text)


_FINAL_STATEMENT_RE = re.compile(r"final answer", re.IGNORECASE)


def parse_prediction(region: str) -> tuple[Parsed, str | None, str | None]:
    """The answer stated in ``region`` (response text after thinking).

    Returns (parsed, extracted_answer, detail). The last \\boxed{} group wins, unless a
    "final answer" statement follows it (the box then held an intermediate result); a box
    holding prose with inline math is searched like a response; without any box, math-verify's
    own extraction is the fallback (noted in ``detail``).
    """
    group = final_boxed_group(region)
    if group:
        statement = _FINAL_STATEMENT_RE.search(region, group[-1].end)
        if statement is not None:
            parsed = _parse(region[statement.start() :])
            if parsed:
                return parsed, _source_string(parsed), "final-answer statement after the last box"
    contents = [c for c in (clean_answer(b.content) for b in group) if c]
    if not contents:
        parsed = _parse(region)
        return parsed, _source_string(parsed), "no \\boxed{} answer; used math-verify's extraction"
    if len(contents) == 1:
        content = contents[0]
        if has_math_delimiters(content):
            return _parse(content), content, None
        return _parse_with_variants(content, "$\\boxed{{{}}}$"), content, None
    joined = ", ".join(c.replace("$", "") for c in contents)
    boxes = ", ".join("\\boxed{" + c.replace("$", "") + "}" for c in contents)
    return _parse("$" + boxes + "$"), joined, None


def _source_string(parsed: Parsed) -> str | None:
    """The answer text math-verify extracted (the string it returns after the sympy object)."""
    return next((p for p in reversed(parsed) if isinstance(p, str)), None)


def _is_exact(parsed: Parsed) -> bool:
    """Whether no parsed sympy object holds a floating-point number."""
    import sympy

    for obj in parsed:
        if isinstance(obj, str):
            continue
        atoms = getattr(obj, "atoms", None)
        if atoms is None or atoms(sympy.Float):
            return False
    return True


def answers_match(
    gold: Parsed, pred: Parsed, extracted: str | None, rounded_min_decimals: int | None
) -> bool:
    """math-verify equivalence, plus: an exact reference accepts a decimal answer correctly
    rounded to the decimals it shows (``1/3`` vs ``0.3333``) when it shows enough of them."""
    from math_verify import verify

    if verify(gold, pred, timeout_seconds=None):
        return True
    if rounded_min_decimals is None or extracted is None:
        return False
    decimals = max_decimals(extracted)
    if not rounded_min_decimals <= decimals < 6 or not _is_exact(gold):
        return False
    return bool(verify(gold, pred, float_rounding=decimals, timeout_seconds=None))


class MathChecker:
    """Checks one response; keeps parsed references (GRPO groups share one reference)."""

    def __init__(self, cfg: VerifyConfig) -> None:
        self.rounded_min_decimals = cfg.rounded_min_decimals
        self._refs: OrderedDict[str, Parsed] = OrderedDict()
        self.reference_parses = 0  # how many references were actually parsed (cache misses)
        # The first parse/verify in a process loads grammars and sympy caches (~1-2 s); pay
        # that here, not inside the first item's timeout.
        answers_match(_parse("$1$"), _parse("$\\boxed{1}$"), "1", None)

    def reference(self, reference: str) -> Parsed:
        """Parsed reference, from the cache when this reference was seen before."""
        if reference in self._refs:
            self._refs.move_to_end(reference)
            return self._refs[reference]
        parsed = parse_reference(reference)
        self.reference_parses += 1
        self._refs[reference] = parsed
        if len(self._refs) > _REF_CACHE_SIZE:
            self._refs.popitem(last=False)
        return parsed

    def __call__(self, response_text: str, reference: str, meta: Mapping[str, Any]) -> Verdict:
        gold = self.reference(reference)
        if not gold:
            return Verdict("error", detail=f"reference answer could not be parsed: {reference!r}")
        region = final_region(response_text)
        if region is None:
            return Verdict("no_answer", detail="thinking never closed (response cut off?)")
        pred, extracted, detail = parse_prediction(region)
        if not pred:
            return Verdict("no_answer", detail="no \\boxed{} answer and nothing math-verify parses")
        correct = answers_match(gold, pred, extracted, self.rounded_min_decimals)
        return Verdict("ok", correct=correct, extracted_answer=extracted, detail=detail)


@register_verifier("math", isolate=True, preload=("sympy", "math_verify"))
def make_math_checker(cfg: VerifyConfig) -> CheckFn:
    """Factory registered as ``math``."""
    return MathChecker(cfg)
