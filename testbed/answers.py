"""Reading a testbed answer: the last boxed content after the thinking, as an integer. Shared by
the column-addition task and the long-chain task (its own module, so neither imports the other)."""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOX_OPEN_RE = re.compile(r"\\boxed\s*\{")
_NOISE_RE = re.compile(r"\{,\}|\\[,!;: ]|[\s,$~]")
_INT_RE = re.compile(r"^[+-]?\d+$")


def normalize_integer(s: str) -> int | None:
    """`' 01,234 '` -> 1234; None when `s` is not an integer. Digit-group separators and spacing
    that do not change an integer ("1,234", "1 234", "1{,}234", "1\\,234") are dropped."""
    s = _NOISE_RE.sub("", s)
    return int(s) if _INT_RE.match(s) else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` after the thinking (what follows the last
    `</think>`; nothing when a think block was opened and never closed), braces balanced."""
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        text = text[close + len(THINK_CLOSE):]
    elif THINK_OPEN in text:
        return None
    found = None
    for m in _BOX_OPEN_RE.finditer(text):
        depth = 0
        for i in range(m.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[m.end():i]
                break
    return found
