"""Cut a response into numbered segments with exact character offsets.

Rules (in order):
1. Lines: the text is cut at every "\\n".
2. A line longer than `max_chars` is cut at sentence ends (".", "!", "?", "。", "！", "？"
   followed by whitespace; so "1.5" and "e.g.x" stay whole).
3. A sentence still longer than `max_chars` is cut at the last whitespace before the limit,
   or exactly at the limit when there is none (e.g. a long LaTeX run).
4. Every piece is trimmed of surrounding whitespace; whitespace-only pieces are not segments.
So `text[s.char_start:s.char_end] == s.text` and the text has no leading/trailing whitespace.
Segment ids are 1-based, in text order.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_SENTENCE_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+")


class Segment(NamedTuple):
    """One numbered piece of the response: `text == response_text[char_start:char_end]`."""

    segment_id: int
    char_start: int
    char_end: int
    text: str


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    """[start, end) shrunk to its non-whitespace extent; None when only whitespace."""
    piece = text[start:end]
    stripped = piece.lstrip()
    if not stripped:
        return None
    lead = len(piece) - len(stripped)
    return start + lead, start + lead + len(stripped.rstrip())


def _hard_split(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Cut [start, end) into pieces of at most max_chars, preferring whitespace cut points."""
    pieces: list[tuple[int, int]] = []
    while end - start > max_chars:
        limit = start + max_chars
        cut = max((m.start() for m in re.finditer(r"\s", text[start + 1 : limit + 1])), default=-1)
        # A cut right at a whitespace keeps words whole; none in reach means one long token run.
        cut = start + 1 + cut if cut >= 0 else limit
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def _line_pieces(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Raw (untrimmed) pieces of one line."""
    if end - start <= max_chars:
        return [(start, end)]
    pieces: list[tuple[int, int]] = []
    sent_start = start
    for m in _SENTENCE_END.finditer(text, start, end):
        pieces.extend(_hard_split(text, sent_start, m.start(), max_chars))
        sent_start = m.end()
    pieces.extend(_hard_split(text, sent_start, end, max_chars))
    return pieces


def segment_response(text: str, max_chars: int = 400) -> list[Segment]:
    """The response's segments, numbered from 1 (see the module docstring for the rules)."""
    if max_chars < 1:
        raise ValueError(f"max_chars={max_chars}: use a positive length (default 400)")
    segments: list[Segment] = []
    line_start = 0
    while line_start <= len(text):
        nl = text.find("\n", line_start)
        line_end = len(text) if nl < 0 else nl
        for raw_start, raw_end in _line_pieces(text, line_start, line_end, max_chars):
            span = _trimmed(text, raw_start, raw_end)
            if span is not None:
                s, e = span
                segments.append(Segment(len(segments) + 1, s, e, text[s:e]))
        if nl < 0:
            break
        line_start = nl + 1
    return segments


def render_segments(segments: list[Segment]) -> str:
    """The annotator's view: one "[id] text" line per segment."""
    return "\n".join(f"[{s.segment_id}] {s.text}" for s in segments)
