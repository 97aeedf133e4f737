"""Rule annotator of the testbed: key steps of correct rollouts, first wrong step of wrong ones.

It re-derives the reference column steps from the operands in the prompt's meta and compares
them with the steps parsed from the response segments (1-based ids, as shown to an annotator).
Parsing is lenient about spacing and commas; a line that starts like a step but does not parse
is itself an error ("malformed step").

In the "split" layout (testbed.task) a step is two segments, the sum ("Step j: x+y+c=s") and
what is written ("write w, carry k"): an error in the sum marks the first, an error in the digit
or carry written the second, and key spans are the second segments of carry-producing steps:
the tokens that decide the step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from trace_rl.testbed.task import KEY_LABEL, Step, extract_answer, reference_steps

_STEP_RE = re.compile(
    r"Step\s*(\d+)\s*:\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*,?\s*"
    r"write\s*(\d+)\s*,?\s*carry\s*(\d+)"
)
_HEAD_RE = re.compile(r"Step\s*(\d+)\s*:\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*$")
_TAIL_RE = re.compile(r"^\s*write\s*(\d+)\s*,?\s*carry\s*(\d+)\s*$")
_STEP_START_RE = re.compile(r"^\s*Step\b", re.MULTILINE)
_BOXED_START_RE = re.compile(r"\\boxed\{")


@dataclass(frozen=True)
class Event:
    """Something found in one segment: a parsed step, a malformed step, or the answer."""

    segment_id: int
    kind: Literal["step", "malformed", "answer"]
    step: Step | None = None
    answer: str | None = None
    written_id: int | None = None  # split layout: the segment of "write w, carry k"

    def deciding_segment(self) -> int:
        """Where the step's written digit and carry are (its own segment in the line layout)."""
        return self.segment_id if self.written_id is None else self.written_id


def _split_step(segments: list[str], i: int) -> Step | None:
    """The split-layout step whose sum is segments[i] and whose written line is segments[i+1]."""
    head = _HEAD_RE.search(segments[i])
    tail = _TAIL_RE.match(segments[i + 1]) if head and i + 1 < len(segments) else None
    if not (head and tail):
        return None
    x, y, c, s = (int(g) for g in head.groups()[1:])
    w, k = (int(g) for g in tail.groups())
    return Step(x, y, c, s, w, k)


def parse_events(segments: list[str], layout: str = "line") -> list[Event]:
    """Steps, malformed step lines and boxed answers, in reading order."""
    events: list[Event] = []
    consumed: set[int] = set()
    for seg_id, text in enumerate(segments, start=1):
        if seg_id in consumed:
            continue
        split = _split_step(segments, seg_id - 1) if layout == "split" else None
        if split is not None:
            events.append(Event(seg_id, "step", step=split, written_id=seg_id + 1))
            consumed.add(seg_id + 1)
            continue
        parsed = list(_STEP_RE.finditer(text))
        for m in parsed:
            x, y, c, s, w, k = (int(g) for g in m.groups()[1:])
            events.append(Event(seg_id, "step", step=Step(x, y, c, s, w, k)))
        if len(_STEP_START_RE.findall(text)) > len(parsed):
            events.append(Event(seg_id, "malformed"))
        if _BOXED_START_RE.search(text):
            events.append(Event(seg_id, "answer", answer=extract_answer(text)))
    return events


def in_sum(got: Step, want: Step) -> bool:
    """True when a wrong step already goes wrong in its sum "x+y+c=s" (digits read, carry in,
    the sum); False when only the digit or carry written is wrong."""
    return (got.x, got.y, got.c) != (want.x, want.y, want.c) or got.s != got.x + got.y + got.c


def classify_step(got: Step, want: Step) -> str:
    """The error label of a parsed step against the reference one ("" when they agree)."""
    if (got.x, got.y) != (want.x, want.y):
        return "wrong digit read"
    if got.c != want.c:
        return "carry dropped" if want.c == 1 else "spurious carry"
    if got.s != got.x + got.y + got.c:
        return "digit sum wrong"
    if got.w != got.s % 10:
        return "wrong digit written"
    if got.k != got.s // 10:
        return "carry dropped" if got.s // 10 == 1 else "spurious carry"
    return ""


def first_error(events: list[Event], ref: list[Step], answer: str) -> tuple[list[int], str]:
    """The segment of the first deviation from the reference computation, with its label."""
    i = 0
    for ev in events:
        if ev.kind == "malformed":
            return [ev.segment_id], "malformed step"
        if ev.kind == "step":
            if i >= len(ref):
                return [ev.segment_id], "extra step"
            label = classify_step(ev.step, ref[i])
            if label:
                where = (ev.segment_id if ev.step is None or in_sum(ev.step, ref[i])
                         else ev.deciding_segment())
                return [where], label
            i += 1
            continue
        if i < len(ref):
            final_carry = i == len(ref) - 1 and ref[i].x == ref[i].y == 0 and ref[i].c == 1
            return [ev.segment_id], "final carry dropped" if final_carry else "missing step"
        if ev.answer != answer:
            return [ev.segment_id], "answer mismatch"
        return [], ""
    if events:
        return [events[-1].segment_id], "incomplete solution"
    return [], ""


def key_steps(events: list[Event], ref: list[Step]) -> list[int]:
    """Segments holding correct steps that produce a carry, in segment order."""
    ids: list[int] = []
    steps = [ev for ev in events if ev.kind == "step"]
    for ev, want in zip(steps, ref):
        if ev.step != want:
            break  # after a deviation the columns no longer line up with the reference
        if want.k == 1 and ev.deciding_segment() not in ids:
            ids.append(ev.deciding_segment())
    return ids


def rule_annotate(prompt: dict, segments: list[str], route: str) -> tuple[list[int], str]:
    """Annotate one rollout: route "key" -> carry-producing steps, "error" -> first wrong step.

    prompt is a prompts row whose meta JSON holds the operands "a" and "b"; segments are the
    response's numbered segments (segment i+1 is segments[i]). Returns 1-based segment ids and a
    type label, or ([], "") when nothing applies (no carries, no deviation found, route "none").
    """
    if route not in ("key", "error", "none"):
        raise ValueError(f"route must be one of 'key', 'error', 'none'; got {route!r}")
    meta = json.loads(prompt["meta"]) if isinstance(prompt["meta"], str) else prompt["meta"]
    if meta.get("task") == "digit_chain":
        from trace_rl.testbed.chain import rule_annotate_chain

        return rule_annotate_chain(meta, segments, route) if route != "none" else ([], "")
    if "a" not in meta or "b" not in meta:
        raise ValueError(
            f"prompt {prompt.get('prompt_id')!r} meta lacks the operands 'a' and 'b'; the rule "
            "annotator only works on testbed prompts (testbed.task.make_prompts)"
        )
    ref = reference_steps(int(meta["a"]), int(meta["b"]))
    events = parse_events(segments, meta.get("layout", "line"))
    if route == "key":
        ids = key_steps(events, ref)
        return (ids, KEY_LABEL) if ids else ([], "")
    if route == "error":
        return first_error(events, ref, str(int(meta["a"]) + int(meta["b"])))
    return [], ""
