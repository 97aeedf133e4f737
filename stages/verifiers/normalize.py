"""String normalisation of math answers before math-verify parses them.

Each rule is general (it rewrites a notation, never a particular answer) and idempotent.
"""

from __future__ import annotations

import re

# One separator between digit groups of a number: "1,000", "1{,}000", "1\,000", "1\!000",
# "1,\!000", "1 000", "1~000". A comma followed by a space is a list ("32, 349"), not one.
_THOUSANDS_SEP = r"(?:\{,\}|,\\!\s?|\\[,!]\s?|\\ |~|,| )"
# The leading group never starts with 0: "0,111" is a decimal comma, not a thousands separator.
_GROUPED_NUMBER_RE = re.compile(rf"^(-?)([1-9]\d{{0,2}}(?:{_THOUSANDS_SEP}\d{{3}})+)(\.\d+)?$")
_SEP_RE = re.compile(_THOUSANDS_SEP)
_DECIMAL_COMMA_RE = re.compile(r"^-?\d+,\d+$")
_PLAIN_THOUSANDS_RE = re.compile(r"^-?[1-9]\d{0,2}(?:,\d{3})+$")
# An array between \left[ ... \right] (or parentheses) is how some models write a matrix.
_ARRAY_MATRIX_RE = re.compile(
    r"\\left\s*[\[(]\s*\\begin\{array\}\{[^{}]*\}(.*?)\\end\{array\}\s*\\right\s*[\])]",
    re.DOTALL,
)
_DECIMALS_RE = re.compile(r"(?<![\d.])\d*\.(\d+)")
_MATH_DELIM_RE = re.compile(r"(?<!\\)\$|\\\(|\\\[")


def strip_trailing_backslashes(s: str) -> str:
    """``'185\\\\'`` -> ``'185'``: a stray trailing backslash breaks the LaTeX parser."""
    return s.strip().rstrip("\\").strip()


def drop_thousands_separators(s: str) -> str:
    """``'1 000'``, ``'7,425,000'``, ``'11,\\\\!111'`` -> digits only, when ``s`` is one number."""
    m = _GROUPED_NUMBER_RE.match(s.strip())
    if m is None:
        return s
    sign, grouped, frac = m.group(1), m.group(2), m.group(3) or ""
    return sign + _SEP_RE.sub("", grouped) + frac


def array_to_pmatrix(s: str) -> str:
    """``\\left[\\begin{array}{cc}..\\end{array}\\right]`` -> ``\\begin{pmatrix}..\\end{pmatrix}``."""
    return _ARRAY_MATRIX_RE.sub(lambda m: r"\begin{pmatrix}" + m.group(1) + r"\end{pmatrix}", s)


def decimal_comma_variant(s: str) -> str | None:
    """``'1000,99'`` -> ``'1000.99'`` (decimal comma), or None when ``s`` is not such a number.

    The comma form is ambiguous with a two-element list, so callers use this as an *extra*
    reading next to the literal one, never as a replacement.
    """
    s = s.strip()
    if _DECIMAL_COMMA_RE.match(s) is None or _PLAIN_THOUSANDS_RE.match(s) is not None:
        return None
    return s.replace(",", ".")


def max_decimals(s: str) -> int:
    """Most digits after a decimal point among the decimal literals in ``s`` (0 if none)."""
    return max((len(m.group(1)) for m in _DECIMALS_RE.finditer(s)), default=0)


def has_math_delimiters(s: str) -> bool:
    """Whether ``s`` is prose with inline math (``$..$``, ``\\(..\\)``, ``\\[..\\]``) in it."""
    return _MATH_DELIM_RE.search(s) is not None


def drop_currency(s: str) -> str:
    """``'\\$16,386.20'`` -> ``'16,386.20'``: an escaped dollar is a currency sign, not math."""
    return s.replace("\\$", "")


def clean_answer(s: str) -> str:
    """All the rewriting rules above, in order, for one answer string."""
    s = drop_currency(s)
    s = strip_trailing_backslashes(s)
    s = array_to_pmatrix(s)
    return drop_thousands_separators(s)
