"""The ``math`` verifier: the stated final answer (extract.py) vs the reference, by math-verify.

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

from trace_rl.stages.verifiers.registry import CheckFn, Verdict, register_verifier
from trace_rl.stages.verifiers.config import VerifyConfig
from trace_rl.stages.verifiers.extract import (
    Statement,
    cut_at_turn_end,
    explicit_statements,
    final_region,
    implicit_statement,
    mask_math,
)
from trace_rl.stages.verifiers.stated import (
    stated_value,
    unclear_after_box,
    unclear_after_statement,
    unclear_box,
    unclear_lead,
    unclear_sentence,
)
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


_WORDS_RE = re.compile(r"(?<!\\)\b[A-Za-z]{2,}")
_STATEMENT_DETAILS = {
    "answer_phrase": "answer from an 'answer is' statement",
    "answer_line": "answer from an 'Answer' line",
    "gsm8k": "answer from a '####' line",
    "whole": "the whole response is the answer",
    "conclusion": "answer from the concluding sentence",
    "closing_value": "answer from the value closing the last sentence",
    "result": "answer from the result of the equation in the last sentence",
    "single_value": "answer from the only number in the last sentence",
}
# Statements whose first complete value is the answer (stated.py).
_VALUE_KINDS = ("answer_phrase", "answer_line", "gsm8k")
NO_ANSWER_DETAIL = (
    "no stated answer (no \\boxed{}, 'the answer is', 'Answer:', '####' or complete "
    "concluding sentence with something math-verify parses)"
)
HEDGE_DETAIL = "no stated answer: the last statement hedges between values ({})"
UNCLEAR_DETAIL = "no stated answer: the last statement is unclear ({}): {}"
CUT_DETAIL = "no stated answer: the response was cut by its token limit inside its answer ({})"
# Statements read from a sentence with no answer phrase: the whole sentence must be clear.
_IMPLICIT_KINDS = ("conclusion", "closing_value", "result", "single_value")


def parse_prediction(region: str, *, cut: bool = False) -> tuple[Parsed, str | None, str | None]:
    """The answer stated in ``region`` (response text after thinking); see extract.py.

    Returns (parsed, extracted_answer, detail); parsed is [] when no answer is stated. The
    last explicit statement that parses wins, unless it hedges between values (stated.py: then
    there is no answer); a concluding sentence or an all-math response counts only when there
    is no explicit statement, and a result sentence only when the response was not ``cut`` by
    its token limit.
    """
    region = cut_at_turn_end(region)
    masked = mask_math(region)
    statements = explicit_statements(region, masked)
    if cut and (unfinished := _unfinished_last_answer(region, statements)) is not None:
        return [], None, CUT_DETAIL.format(repr(unfinished[-60:]))
    for statement in reversed(statements):
        if statement.kind in _VALUE_KINDS and (stated := stated_value(statement.text)) is not None:
            if stated.kind == "hedge":
                return [], None, HEDGE_DETAIL.format(repr(stated.text[:60]))
            if stated.kind == "unclear":
                return [], None, UNCLEAR_DETAIL.format(stated.text, repr(statement.text[:60]))
            parsed, extracted = _parse_boxes((stated.text,))
        else:
            parsed, extracted = _parse_statement(statement)
        if parsed:
            if (why := _unclear_context(region, masked, statement)) is not None:
                return [], None, UNCLEAR_DETAIL.format(why, repr(statement.text[:60]))
            if cut and _runs_into_cut(region, statement):
                return [], None, CUT_DETAIL.format(repr(statement.text[-60:]))
            return parsed, extracted, _STATEMENT_DETAILS.get(statement.kind)
    statement = implicit_statement(region, masked, results=not cut)
    if statement is not None:
        parsed, extracted = _parse_statement(statement)
        if parsed:
            if (why := _unclear_context(region, masked, statement)) is not None:
                return [], None, UNCLEAR_DETAIL.format(why, repr(statement.text[:60]))
            if cut and _runs_into_cut(region, statement):
                return [], None, CUT_DETAIL.format(repr(statement.text[-60:]))
            return parsed, extracted, _STATEMENT_DETAILS[statement.kind]
    return [], None, NO_ANSWER_DETAIL


def _unfinished_last_answer(region: str, statements: list[Statement]) -> str | None:
    """The answer a cut response was writing when the cut came, or None: an unclosed box at
    its end ("... = \\boxed{3" of 350), or a last answer statement that runs into the cut
    ("the answer is $\\frac{3}{4"). Either is skipped as unparsable, so without this check an
    earlier answer the response was going on to restate or revise would be read instead."""
    box = max(region.rfind("\\boxed"), region.rfind("\\fbox"))
    rest = region[box:] if box >= 0 else ""
    if rest and (rest.count("{") > rest.count("}") or rest.rstrip() in ("\\boxed", "\\fbox")):
        return rest
    last = statements[-1] if statements else None
    if last is not None and last.kind in _VALUE_KINDS and re.search(r"[\d$\\]", last.text):
        return last.text if _runs_into_cut(region, last) else None
    return None


def _runs_into_cut(region: str, statement: Statement) -> bool:
    """True when a statement reaches the end of a response cut by its token limit without
    closing: "the answer is 12" may have gone on as 125 or 12.5, "\\boxed{12" as \\boxed{125}.
    A closed box or math span, or a sentence end that is not a decimal point, is complete."""
    if statement.kind == "boxed":  # a box is only found with its closing brace
        return False
    at = region.find(statement.text, statement.start)
    tail = region[at + len(statement.text):] if at >= 0 else "?"
    if tail.strip() not in ("", "."):
        return False  # something follows the statement: it ended before the cut
    text = (statement.text + tail).rstrip()  # a last "." may be a decimal point ("12." of 12.5)
    if text.count("{") > text.count("}"):
        return True
    if "\n" in tail or re.fullmatch(r"\.\s+", tail):
        return False  # a line break, or a period and a space, ends it: "12.\n" is not 12.5
    closed = text.endswith(("}", "$", "\\)", "\\]", "!", "?"))
    return not (closed or (text.endswith(".") and not text[-2:-1].isdigit()))


def _unclear_context(region: str, masked: str, statement: Statement) -> str | None:
    """Why the sentence around a statement makes its value unclear (stated.py), or None: the
    text before it ("I don't think the answer is"), a question mark or a retraction after it
    ("... \\boxed{35}. Hmm, that's not right."), and for a statement with no answer phrase
    the whole sentence ("Sam has at least 14 stickers.")."""
    sentence_start = max(masked.rfind(ch, 0, statement.start) for ch in ".!?\n") + 1
    end = region.find(statement.text, statement.start)
    end = statement.start + len(statement.text) if end < 0 else end + len(statement.text)
    after = region[end:]
    if statement.kind in _IMPLICIT_KINDS:
        stop = re.search(r"[.!?](?=\s|$)|\n", masked[end:])
        sentence = region[sentence_start : end + (stop.end() if stop else len(after))]
        if (why := unclear_sentence(sentence)) is not None:
            return why
    elif statement.kind == "boxed":
        # The box is the commitment: only a negation right before it withdraws it, and a bound
        # only when it is what an answer phrase states ("the answer is at least $\\boxed{12}$");
        # otherwise a bound word is how a max/min answer reads ("Zach can have at most
        # $\\boxed{2}$ pencils left over").
        lead = region[sentence_start : statement.start]
        why = unclear_lead(lead, near=True)
        answer_phrase = re.search(r"\banswer\b", lead, re.I) is not None
        if why == "negated" or (why is not None and answer_phrase):
            return why
        if (why := next(filter(None, map(unclear_box, statement.boxes)), None)) is not None:
            return why
        stop = re.search(r"[.!?](?=\s|$)|\n", masked[end:])
        rest = region[end : end + (stop.start() if stop else len(after))]
        if (why := unclear_after_box(rest, answer_phrase=answer_phrase)) is not None:
            return why
    elif (why := unclear_lead(region[sentence_start : statement.start])) is not None:
        return why
    return unclear_after_statement(after)


def _parse_statement(statement: Statement) -> tuple[Parsed, str | None]:
    """A statement's answer parsed, and its text; [] when it states nothing math-verify reads."""
    if statement.kind == "boxed":
        return _parse_boxes(statement.boxes)
    text = statement.text.strip().rstrip(".,;:").strip()
    if not text:
        return [], None
    if has_math_delimiters(text) or _WORDS_RE.search(text) is not None:
        # Prose or inline math: math-verify picks the expression out of this one statement.
        parsed = _parse(text)
        return parsed, _source_string(parsed)
    return _parse_boxes((text,))


def _parse_boxes(boxes: tuple[str, ...]) -> tuple[Parsed, str | None]:
    """Box contents (or a bare answer) parsed as one answer; a box holding prose with inline
    math is searched like a response."""
    contents = [c for c in (clean_answer(b) for b in boxes) if c]
    if not contents:
        return [], None
    if len(contents) == 1:
        content = contents[0]
        if has_math_delimiters(content):
            return _parse(content), content
        return _parse_with_variants(content, "$\\boxed{{{}}}$"), content
    joined = ", ".join(c.replace("$", "") for c in contents)
    boxes_tex = ", ".join("\\boxed{" + c.replace("$", "") + "}" for c in contents)
    return _parse("$" + boxes_tex + "$"), joined


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
        pred, extracted, detail = parse_prediction(region, cut=meta.get("finish_reason") == "length")
        if not pred:
            return Verdict("no_answer", detail=detail)
        correct = answers_match(gold, pred, extracted, self.rounded_min_decimals)
        return Verdict("ok", correct=correct, extracted_answer=extracted, detail=detail)


@register_verifier("math", isolate=True, preload=("sympy", "math_verify"))
def make_math_checker(cfg: VerifyConfig) -> CheckFn:
    """Factory registered as ``math``."""
    return MathChecker(cfg)
