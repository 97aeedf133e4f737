"""Locating the final answer in a response: the text after the thinking, and its \\boxed{}."""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(\s*)")
# Boxes of one multi-part answer ("\boxed{1} and \boxed{2}") sit close together; a box further
# back than this, or behind a blank line, belongs to earlier work.
MAX_GROUP_GAP_CHARS = 80


@dataclass(frozen=True)
class Boxed:
    """One ``\\boxed{...}``: its content and the half-open char span of the whole command."""

    content: str
    start: int
    end: int


def final_region(text: str) -> str | None:
    """The part of a response that states the answer: what follows the last ``</think>``.

    Returns None when a thinking block was opened and never closed (the response was cut off
    while thinking, so it has no answer). Responses without thinking tags are returned whole.
    """
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE) :]
    if THINK_OPEN in text:
        return None
    return text


def _match_brace(text: str, open_pos: int, escapes: bool) -> int | None:
    """Index just past the brace closing ``text[open_pos] == '{'``, or None if unbalanced.

    With ``escapes`` a backslash skips the next char, so ``\\{`` and ``\\}`` (set braces) do
    not count; without it they count like plain braces.
    """
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\" and escapes:
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def find_boxed(text: str) -> list[Boxed]:
    """Every ``\\boxed{...}`` / ``\\fbox{...}`` in order (also ``\\boxed 5``).

    A box left unbalanced by escaped braces is retried with ``\\}`` counted as a brace, since
    models sometimes write a stray backslash before the closing brace (``\\boxed{185\\}``).
    """
    found: list[Boxed] = []
    pos = 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        i = m.end()
        if i < len(text) and text[i] == "{":
            end = _match_brace(text, i, escapes=True) or _match_brace(text, i, escapes=False)
            if end is None:
                pos = i
                continue
            found.append(Boxed(text[i + 1 : end - 1], m.start(), end))
        else:
            word = re.match(r"[^\s$\\{}]+", text[i:]) if m.group(1) else None
            if word is None:
                pos = i
                continue
            end = i + word.end()
            found.append(Boxed(word.group(0), m.start(), end))
        pos = end
    return found


def final_boxed_group(text: str) -> list[Boxed]:
    """The last box and the boxes right before it that form one answer.

    ``"... so x = \\boxed{3}. Answer: \\boxed{1} and \\boxed{2}"`` gives ["1", "2"] when the
    gap before ``\\boxed{1}`` exceeds MAX_GROUP_GAP_CHARS or holds a blank line (contents shown).
    """
    boxes = find_boxed(text)
    if not boxes:
        return []
    group = [boxes[-1]]
    for prev in reversed(boxes[:-1]):
        gap = text[prev.end : group[0].start]
        if len(gap) > MAX_GROUP_GAP_CHARS or "\n\n" in gap:
            break
        group.insert(0, prev)
    return group
