"""Turn chosen segment ids into token spans, applying the coverage cap.

Grouping: the chosen ids are sorted and consecutive ids form one span (so neighbouring
segments never become two spans that share a boundary token). Each span keeps the label.

Cap order: spans are admitted in the annotator's order of preference: a span's rank is the
earliest position of any of its ids in the annotator's list (for [7, 3, 4]: span [7] first,
then [3, 4]). A span is admitted whole when its tokens fit what is left of
floor(coverage_cap * n_tokens), and dropped otherwise: it is never cut, since cutting keeps
its opening tokens, which an annotator that chose whole segments did not single out (a reply
marking every segment would become "the first quarter of the response"). Later spans that fit
are still admitted. Drops are recorded in the row's `error` field ("coverage_cap: ...").
When spans were chosen but none fits, `too_broad` is set and the row's status is `too_broad`
(no spans; the trainer treats it as unannotated). The returned spans are sorted by position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trace_rl.stages.annotators.align import char_span_to_tokens, offset_index
from trace_rl.stages.annotators.segments import Segment


@dataclass
class SpanPlan:
    """Spans of one rollout (annotations-row dicts), their token coverage and any cap note."""

    spans: list[dict]
    coverage: float
    note: str | None
    too_broad: bool = False


def group_ids(ids: Sequence[int]) -> list[list[int]]:
    """Consecutive runs of the sorted ids, ordered by the annotator's preference."""
    rank = {i: k for k, i in reversed(list(enumerate(ids)))}
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return sorted(runs, key=lambda run: min(rank[i] for i in run))


def _take_uncovered(covered: list[bool], t0: int, t1: int, budget: int) -> tuple[int, int]:
    """(new end, tokens newly covered): the range [t0, end) holds at most `budget` new tokens."""
    taken = 0
    for t in range(t0, t1):
        if not covered[t]:
            if taken == budget:
                return t, taken
            taken += 1
            covered[t] = True
    return t1, taken


def build_spans(
    segments: Sequence[Segment],
    ids: Sequence[int],
    label: str,
    offsets: Sequence[tuple[int, int]] | np.ndarray,
    text: str,
    coverage_cap: float,
    index: tuple[np.ndarray, np.ndarray] | None = None,
) -> SpanPlan:
    """Spans for validated 1-based `ids`; `offsets` from token_char_offsets ([T] pairs, or
    TokenOffsets.offsets_T2), `index` their offset_index (computed when None)."""
    n_tokens = len(offsets)
    budget = math.floor(coverage_cap * n_tokens + 1e-9)
    covered = [False] * n_tokens
    by_id = {s.segment_id: s for s in segments}
    index = index if index is not None else offset_index(offsets)
    spans: list[dict] = []
    used, wanted, dropped = 0, 0, []
    for run in group_ids(ids):
        c0, c1 = by_id[run[0]].char_start, by_id[run[-1]].char_end
        tok = char_span_to_tokens(offsets, text, c0, c1, index)
        if tok is None:
            continue
        t0, t1 = tok
        new = sum(1 for t in range(t0, t1) if not covered[t])
        wanted += new
        if used + new > budget:
            dropped.extend(run)
            continue
        end, taken = _take_uncovered(covered, t0, t1, new)
        used += taken
        spans.append(
            {
                "segment_ids": list(run),
                "char_start": c0,
                "char_end": c1,
                "token_start": t0,
                "token_end": end,
                "label": label,
            }
        )
    spans.sort(key=lambda s: s["token_start"])
    note = None
    if used < wanted:
        note = (
            f"coverage_cap: kept {used} of {wanted} span tokens (cap {coverage_cap} x "
            f"{n_tokens} tokens = {budget}); dropped segments {sorted(dropped)} whole"
        )
    too_broad = not spans and wanted > 0
    return SpanPlan(spans, used / n_tokens if n_tokens else 0.0, note, too_broad)
