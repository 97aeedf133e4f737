"""`inspect`'s per-dataset summaries: pure functions, one Arrow table in, one dict out,
registered by schema name."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .layout import ROUND_RE, policy_index


@dataclass
class Dataset:
    """One dataset as read: `label` is its path relative to what the user named."""

    label: str
    path: str
    schema: str
    table: pa.Table
    complete: bool

    @property
    def round(self) -> int | None:
        """The round a round dataset belongs to; None for an evaluation (`eval/round-000k/` is
        the checkpoint round k-1 wrote: policy k, which sampled round k, not round k's data)."""
        if self.schema == "eval_samples":
            return None
        m = ROUND_RE.search(self.path)
        return int(m.group(1)) if m else None

    @property
    def heading(self) -> str | None:
        """The rule above the dataset: "round k" (its data: policy k sampled it), or "policy k"
        for an evaluation of checkpoint k."""
        if self.schema == "eval_samples":
            parts = self.path.rstrip("/").split("/")
            ckpt = parts[parts.index("eval") + 1] if "eval" in parts[:-1] else None
            k = policy_index(ckpt) if ckpt else None
            if k is None:
                return f"evaluation of {ckpt}" if ckpt else None
            if k == 0:
                return f"policy 0 ({ckpt}, the initial model; it sampled round 0)"
            # not "it sampled round k": the last policy of a run sampled nothing
            return f"policy {k} ({ckpt}, what round {k - 1}'s train wrote)"
        k = self.round
        return None if k is None else f"round {k} (sampled by policy {k})"


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values),
            "median": statistics.median(values), "max": max(values)}


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    return dict(Counter(table.column(column).to_pylist()).most_common())


def summarize_rollouts(t: pa.Table) -> dict[str, Any]:
    lengths = pc.list_value_length(t.column("response_token_ids")).to_pylist()
    return {"rows": t.num_rows, "prompts": len(set(t.column("prompt_id").to_pylist())),
            "finish_reasons": _counts(t, "finish_reason"), "engines": _counts(t, "engine"),
            "response_tokens": _stats(lengths)}


def summarize_verdicts(t: pa.Table) -> dict[str, Any]:
    rewards = t.column("reward").to_pylist()
    correct = sum(t.column("correct").to_pylist())
    return {"rows": t.num_rows, "status": _counts(t, "status"), "correct": correct,
            "correct_rate": correct / t.num_rows if t.num_rows else None,
            "reward_mean": statistics.fmean(rewards) if rewards else None}


# Statuses of rows the annotator read and answered (stages/annotators/base.py): `no_spans` and
# `too_broad` rows were annotated, they just give nothing to distill; the others (skipped by
# route or alignment, parse/api errors, timeouts) were not.
ANNOTATED_STATUSES = ("ok", "no_spans", "too_broad")


def summarize_annotations(t: pa.Table) -> dict[str, Any]:
    routes = t.column("route").to_pylist()
    spans = t.column("spans").to_pylist()
    coverage = t.column("coverage").to_pylist()
    spans_by_route: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for route, row_spans in zip(routes, spans):
        spans_by_route[route] += len(row_spans)
        labels.update(s["label"] or "(no label)" for s in row_spans)
    with_spans = [c for c, s in zip(coverage, spans) if s and c is not None]
    # NULL: nothing was distilled from the row (runs written before issue 28 hold 0.0 on too_broad and
    # no_spans rows; `coverage_of_rows_with_spans` is the same mean for them)
    annotated = [c for c in coverage if c is not None]
    return {"rows": t.num_rows, "status": _counts(t, "status"), "route": _counts(t, "route"),
            "spans": sum(spans_by_route.values()), "spans_by_route": dict(spans_by_route),
            "labels": dict(labels.most_common()), "rows_without_spans": sum(not s for s in spans),
            "coverage": _stats(annotated), "coverage_of_rows_with_spans": _stats(with_spans),
            "not_annotated": sum(s not in ANNOTATED_STATUSES for s in t.column("status").to_pylist()),
            "annotators": _counts(t, "annotator")}


def summarize_train_metrics(t: pa.Table) -> dict[str, Any]:
    t = t.sort_by("step")
    metrics = {}
    for name in t.column_names:
        if name in ("step", "round") or not pa.types.is_floating(t.schema.field(name).type) \
                and not pa.types.is_integer(t.schema.field(name).type):
            continue
        values = [v for v in t.column(name).to_pylist() if v is not None]
        if values:
            metrics[name] = {"first": values[0], "last": values[-1]}
    steps = t.column("step").to_pylist()
    return {"rows": t.num_rows, "steps": [steps[0], steps[-1]] if steps else None,
            "metrics": metrics}


def summarize_prompts(t: pa.Table) -> dict[str, Any]:
    return {"rows": t.num_rows, "sources": _counts(t, "source"),
            "with_solution": t.num_rows - t.column("solution").null_count}


def summarize_eval_samples(t: pa.Table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bench in sorted(set(t.column("benchmark").to_pylist())):
        sub = t.filter(pc.equal(t.column("benchmark"), bench))
        correct = sum(sub.column("correct").to_pylist())
        out[bench] = {"samples": sub.num_rows, "accuracy": correct / sub.num_rows,
                      "mean_tokens": statistics.fmean(sub.column("num_tokens").to_pylist())}
    return {"rows": t.num_rows, "benchmarks": out}


SUMMARIZERS: dict[str, Callable[[pa.Table], dict[str, Any]]] = {
    "rollouts": summarize_rollouts, "verdicts": summarize_verdicts,
    "annotations": summarize_annotations, "train_metrics": summarize_train_metrics,
    "prompts": summarize_prompts, "eval_samples": summarize_eval_samples,
}
