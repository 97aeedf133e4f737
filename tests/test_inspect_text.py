"""Span rendering helpers of `trace-rl inspect` on hand-made inputs (no run directory)."""

from __future__ import annotations

from trace_rl.pipeline.html_view import split_spans
from trace_rl.pipeline.inspect_terminal import example_text


def test_example_text_cuts_long_responses_around_spans() -> None:
    text = "a" * 1000 + "KEY STEP" + "b" * 1000
    span = {"char_start": 1000, "char_end": 1008, "label": "x"}
    rendered = example_text({"response_text": text, "spans": [span], "route": "key"}, context=50)
    assert rendered.plain == "… " + "a" * 50 + "⟪KEY STEP⟫⟦x⟧" + "b" * 50 + " …"


def test_split_spans_clamps_and_keeps_one_piece_per_span() -> None:
    spans = [{"char_start": 2, "char_end": 5, "label": "a"},
             {"char_start": 4, "char_end": 8, "label": "b"},
             {"char_start": 9, "char_end": 99, "label": "c"}]
    pieces = split_spans("0123456789", spans)
    assert [(p.start, p.end, p.span and p.span["label"]) for p in pieces] == [
        (0, 2, None), (2, 5, "a"), (5, 8, "b"), (8, 9, None), (9, 10, "c")]
    assert [(p.start, p.end) for p in split_spans("", [])] == [(0, 0)]
