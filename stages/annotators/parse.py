"""Strict parsing of an annotator's reply into segment ids and a type label.

Accepted reply: one JSON object, optionally inside a ```json fence, optionally after a
reasoning block closed by "</think>":
    {"segment_ids": [3, 4, 9], "label": "missing case analysis"}
Decisions (documented in the annotations rows):
- not JSON / not an object / no "segment_ids" list of integers -> parse_error;
- [] -> no_spans;
- ids outside 1..n_segments are dropped, repeated ids kept once; either case adds a note to
  the row's `error` field; when no valid id is left -> parse_error;
- a missing or non-string label becomes ""; the label is flattened to one line and cut at
  MAX_LABEL_CHARS (it is shown to the teacher).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_LABEL_CHARS = 120
_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class ParsedReply:
    """The annotator's choice: ids in its order (validated), label, status and notes."""

    segment_ids: list[int]
    label: str
    status: str  # ok | no_spans | parse_error
    note: str | None


def _strip_wrappers(raw: str) -> str:
    text = raw.strip()
    if "</think>" in text:
        # Reasoning models (the self annotator in thinking mode) put the answer after the block.
        text = text.rsplit("</think>", 1)[1].strip()
    m = _FENCE.match(text)
    return m.group(1).strip() if m else text


def clean_label(label: object) -> str:
    """One-line label of at most MAX_LABEL_CHARS characters ("" when not a string)."""
    if not isinstance(label, str):
        return ""
    return " ".join(label.split())[:MAX_LABEL_CHARS]


def validate_ids(ids: Sequence[int], n_segments: int, label: str) -> ParsedReply:
    """Apply the id rules to an already-decoded id list (shared by every backend)."""
    if len(ids) == 0:
        return ParsedReply([], label, "no_spans", None)
    notes: list[str] = []
    out_of_range = [i for i in ids if not 1 <= i <= n_segments]
    seen: set[int] = set()
    valid: list[int] = []
    for i in ids:
        if 1 <= i <= n_segments and i not in seen:
            seen.add(i)
            valid.append(i)
    if out_of_range:
        notes.append(
            f"dropped out-of-range segment ids {out_of_range[:20]} (valid 1..{n_segments})"
        )
    if len(valid) + len(out_of_range) < len(ids):
        notes.append("dropped repeated segment ids")
    note = "; ".join(notes) or None
    if not valid:
        return ParsedReply([], label, "parse_error", note)
    return ParsedReply(valid, label, "ok", note)


def parse_reply(raw: str, n_segments: int) -> ParsedReply:
    """Parse one reply (see the module docstring for the accepted form and the decisions)."""
    try:
        obj = json.loads(_strip_wrappers(raw))
    except (json.JSONDecodeError, TypeError) as e:
        return ParsedReply([], "", "parse_error", f"reply is not JSON: {e}")
    if not isinstance(obj, dict):
        return ParsedReply([], "", "parse_error", "reply is JSON but not an object")
    ids = obj.get("segment_ids")
    # bool is an int subclass in Python; true/false are not segment ids.
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        return ParsedReply([], "", "parse_error", "'segment_ids' must be a list of integers")
    return validate_ids(ids, n_segments, clean_label(obj.get("label")))
