"""The value an "the answer is ..." / "Answer: ..." statement states.

The statement's text runs to the end of its sentence or line (extract.py); what it *states* is
its first complete value, read here:

- a number (sign, thousands separators, decimals) with an optional currency sign before it and
  a unit, ``%`` or any words after it: "The answer is $1,200 a month." states 1200;
- an arithmetic chain counts as one value, its last right-hand side: "8 x 5 = 40" states 40,
  "18 - 6" states 12; a justification or parenthetical after it is not part of it:
  "40 (from 8 x 5)", "9 because 3 + 4 = 7", "4, not 5";
- a leading math span (``$40$``, ``\\(8 \\times 5 = 40\\)``) is read the same way inside.

A statement that offers several values as alternatives is a **hedge** and states no answer:
"12 or 13", "12 marbles or maybe 13", "either 6 or 7", "between 2 and 3", "2 to 3", "2-3". The
checker scores it ``no_answer`` (reward 0): no single value was committed to, and an earlier
statement does not count either, since the response withdrew it by hedging last.

Anything that does not open with a plain number (``\\frac{1}{2}``, ``x = 2``, ``3\\sqrt{2}``,
``5, 7``, "Sam has 9 marbles") is left to math-verify over the whole statement, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_MATH_SPAN_RE = re.compile(r"^(?:\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\])", re.DOTALL)
_CURRENCY = "$€£¥₹"
# A number: optional sign, digits with thousands separators "1,234" (a comma NOT followed by a
# space and three digits is the end of the value), optional decimals.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_OP = r"(?:[-+*/×÷x]|\\times|\\cdot|\\div)"
_LEAD_WORDS_RE = re.compile(
    r"^(?:approximately|about|around|roughly|exactly|just|only)\s+", re.IGNORECASE
)
_HEDGE_OPEN_RE = re.compile(r"^(?:either|between)\b", re.IGNORECASE)
_NUMBER_RE = re.compile(_NUMBER)
_CHAIN_RE = re.compile(
    rf"(?P<chain>{_NUMBER}(?:\s*(?:{_OP}|=)\s*[{re.escape(_CURRENCY)}]?{_NUMBER})*)"
)
# After the value: what makes it a hedge ("or 13", "or maybe 13", "to 3", "-3" range, "and 3"
# after "between"), what makes it something other than a plain number (LaTeX, a variable, a
# power: math-verify reads those), and a list "5, 7" (math-verify reads it as a set).
_HEDGE_AFTER_RE = re.compile(
    rf"^\s*(?:,?\s*(?:or|to)\s+(?:maybe\s+|perhaps\s+|possibly\s+|even\s+)?|[-–~]\s*"
    rf"|(?:[A-Za-z]+,?\s+){{1,2}}or\s+(?:maybe\s+|perhaps\s+|possibly\s+)?)"
    rf"[{re.escape(_CURRENCY)}]?{_NUMBER}\b",
    re.IGNORECASE,
)
_NOT_PLAIN_AFTER_RE = re.compile(
    r"^(?:[A-Za-z(\\^_{!'√]|\s*[\\^_{]|\s*:\s*\d|\s*[a-z]\b(?!\s+[a-z]))"
)
_LIST_AFTER_RE = re.compile(rf"^\s*(?:,|;|,?\s*and\s)\s*\$?{_NUMBER}\b(?!\s*[a-z])")
_LATEX_THOUSANDS_RE = re.compile(r"(?<=\d)(?:\{,\}|,\\!|\\,|\\!|\\ )(?=\d{3})")
_TIMES_RE = re.compile(r"\\times|\\cdot|×|(?<=\d)\s*x\s*(?=\d)")

StatedKind = Literal["value", "hedge"]


@dataclass(frozen=True)
class Stated:
    """What a statement states: a plain ``value`` (sympy-ready text) or a ``hedge``."""

    kind: StatedKind
    text: str


def stated_value(statement: str) -> Stated | None:
    """The first complete value of an answer statement's text, a hedge, or None when the text
    does not open with a plain number (the caller then parses the whole text as before)."""
    text = statement.strip().lstrip(":*_ ").strip()
    if (span := _MATH_SPAN_RE.match(text)) is not None:
        inner = next(g for g in span.groups() if g is not None).strip()
        inner = _LATEX_THOUSANDS_RE.sub(",", inner)
        rest = text[span.end():]
        got = _leading(inner, rest_after=rest)
        return Stated("hedge", text) if got is not None and got.kind == "hedge" else got
    return _leading(text, rest_after="")


def _leading(text: str, rest_after: str) -> Stated | None:
    text = _LEAD_WORDS_RE.sub("", text)
    if _HEDGE_OPEN_RE.match(text):
        return Stated("hedge", text) if len(_NUMBER_RE.findall(text)) >= 2 else None
    if text[:1] in _CURRENCY and text[1:2].isdigit():
        text = text[1:]
    m = _CHAIN_RE.match(text)
    if m is None:
        return None
    chain, after = m.group("chain"), text[m.end():]
    is_range = re.fullmatch(rf"{_NUMBER}\s*[-–~]\s*{_NUMBER}", chain) and " - " not in chain
    if "=" not in chain and is_range:
        return Stated("hedge", chain)  # "2-3": a range, not a subtraction
    if _NOT_PLAIN_AFTER_RE.match(after) or _LIST_AFTER_RE.match(after):
        return None
    if "=" not in chain and _HEDGE_AFTER_RE.match(after + rest_after):
        return Stated("hedge", text)
    value = chain.rsplit("=", 1)[-1].strip()
    value = _TIMES_RE.sub("*", value).replace("÷", "/").replace("\\div", "/")
    value = re.sub(rf"[{re.escape(_CURRENCY)}]", "", value)
    value = re.sub(r"(?<=\d),(?=\d{3})", "", value)
    return Stated("value", value)
