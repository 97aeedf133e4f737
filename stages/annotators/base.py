"""annotate_rows: one annotations row per rollout, whatever the backend.

Flow per item: route "none" -> skipped (no call); otherwise segment the response, map tokens
to characters (a mismatch between response_text and response_token_ids -> skipped, with the
reason in `error`, before anything is paid for), ask the backend for segment ids + label,
validate them (parse.py), map them to token spans under the coverage cap (spans.py).

Backends: "api" and "self" produce reply text (through the reply cache), "rule" and
"surprise" (the teacher's divergence, surprise.py) return ids directly, "equations"
(equations.py) character spans.
Row statuses: ok | no_spans | too_broad | parse_error | api_error | timeout | skipped;
`too_broad`: the annotation chose something, but not even its most specific part fits the
coverage cap, so it is kept as no selection (the trainer uses only `ok` rows' spans).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trace_rl.stages.annotators.align import (
    AlignmentError,
    TokenOffsets,
    is_byte_level,
    token_char_offsets,
    token_offsets,
)
from trace_rl.stages.annotators.config import AnnotateConfig
from trace_rl.stages.annotators.parse import ParsedReply, clean_label, validate_ids
from trace_rl.stages.annotators.segments import Segment, segment_response
from trace_rl.stages.annotators.spans import build_spans

log = logging.getLogger(__name__)
ROUTES = ("key", "error", "none")


@dataclass
class Job:
    """An item that needs an annotator. `prepare` segments it and checks its tokens (the CPU
    work per item, run just before its request so that it overlaps requests in flight)."""

    index: int
    item: dict
    tokenizer: Any
    segments: list[Segment] = field(default_factory=list)
    _offsets: TokenOffsets | None = None

    def prepare(self, cfg: AnnotateConfig, annotator: str) -> dict | None:
        """Segment the response and check that its ids decode to its text, before anything is
        paid for; the row when no annotator is needed (alignment failure, empty response)."""
        text, ids = self.item["response_text"], list(self.item["response_token_ids"])
        try:
            if is_byte_level(self.tokenizer):
                # Exact offsets cost about one decode here, so they are the check.
                self._offsets = token_offsets(self.tokenizer, ids, text)
            elif not decodes_to(self.tokenizer, ids, text):
                token_char_offsets(self.tokenizer, ids, text)  # for its precise message
                raise AlignmentError("response_text is not the decoding of response_token_ids")
        except AlignmentError as e:
            return make_row(self.item, annotator, "skipped", error=f"alignment: {e}")
        self.segments = segment_response(text, cfg.max_segment_chars)
        if not self.segments:
            return make_row(self.item, annotator, "no_spans", error="the response is empty")
        return None

    def offsets(self) -> TokenOffsets:
        """token_offsets of the response, computed once (by prepare for byte-level
        tokenizers; else on first use, the quadratic fallback)."""
        if self._offsets is None:
            ids, text = self.item["response_token_ids"], self.item["response_text"]
            self._offsets = token_offsets(self.tokenizer, ids, text)
        return self._offsets


def decodes_to(tokenizer: Any, token_ids: list[int], text: str) -> bool:
    """Cheap guard (one native decode): do the generated ids decode to `text`?"""
    return any(
        tokenizer.decode(token_ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        == text
        for skip in (True, False)
    )


def make_row(
    item: dict,
    annotator: str,
    status: str,
    *,
    spans: list[dict] | None = None,
    coverage: float = 0.0,
    raw: str | None = None,
    error: str | None = None,
    latency_s: float = 0.0,
) -> dict:
    """An annotations row (shared contracts) for one rollout."""
    return {
        "rollout_id": item["rollout_id"],
        "route": item["route"],
        "annotator": annotator,
        "spans": spans or [],
        # Coverage has one meaning: the fraction of response tokens in the spans distilled from
        # the row. A row nothing was distilled from (skipped, an error, no_spans, too_broad)
        # has none: NULL, not 0, so no mean of coverage averages in rows without spans.
        "coverage": float(coverage) if status == "ok" and spans else None,
        "status": status,
        "raw_response": raw,
        "error": error,
        "latency_s": float(latency_s),
    }


def _join(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None


def split_routes(
    items: list[dict], tokenizer: Any, annotator: str
) -> tuple[list[dict | None], list[Job]]:
    """Rows of items routed "none" (skipped) and jobs for the others (not yet prepared)."""
    rows: list[dict | None] = [None] * len(items)
    jobs: list[Job] = []
    for i, item in enumerate(items):
        route = item.get("route")
        if route not in ROUTES:
            raise ValueError(
                f"rollout {item.get('rollout_id')!r}: route={route!r}; use one of {ROUTES}"
            )
        if route == "none":
            rows[i] = make_row(item, annotator, "skipped")
        else:
            jobs.append(Job(i, item, tokenizer))
    return rows, jobs


def prepare(
    cfg: AnnotateConfig, items: list[dict], tokenizer: Any, annotator: str
) -> tuple[list[dict | None], list[Job]]:
    """Rows decided without an annotator (skipped, empty) and the prepared jobs that need one."""
    rows, pending = split_routes(items, tokenizer, annotator)
    return rows, prepare_jobs(cfg, pending, annotator, rows)


def prepare_jobs(
    cfg: AnnotateConfig,
    jobs: list[Job],
    annotator: str,
    rows: list[dict | None],
    tick: Callable[[], None] = lambda: None,
) -> list[Job]:
    """Prepare every job up front (batch backends): the row of each job that needs no annotator
    goes into `rows` at its place (and ticks); the jobs that do are returned."""
    ready = []
    for job in jobs:
        rows[job.index] = job.prepare(cfg, annotator)
        if rows[job.index] is None:
            ready.append(job)
        else:
            tick()
    return ready


def finish(
    cfg: AnnotateConfig,
    job: Job,
    annotator: str,
    parsed: ParsedReply,
    raw: str | None,
    latency_s: float,
) -> dict:
    """The row of a job whose reply was obtained (parsed or not)."""
    if parsed.status != "ok":
        return make_row(
            job.item, annotator, parsed.status, raw=raw, error=parsed.note, latency_s=latency_s
        )
    try:
        offsets = job.offsets()
    except AlignmentError as e:  # the native decode agreed but ours did not: keep the reply
        return make_row(
            job.item, annotator, "skipped", raw=raw, error=f"alignment: {e}", latency_s=latency_s
        )
    plan = build_spans(
        job.segments,
        parsed.segment_ids,
        parsed.label,
        offsets.offsets_T2,
        job.item["response_text"],
        cfg.coverage_cap,
        offsets.index,
    )
    status = "ok" if plan.spans else "too_broad" if plan.too_broad else "no_spans"
    return make_row(
        job.item,
        annotator,
        status,
        spans=plan.spans,
        coverage=plan.coverage,
        raw=raw,
        error=_join(parsed.note, plan.note),
        latency_s=latency_s,
    )


def load_rule(spec: str) -> Callable[[dict, list[str], str], tuple[list[int], str]]:
    """Import 'module:function' lazily (the rule module may live in another package)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"rule_fn={spec!r} cannot be imported ({e}); set annotate.rule_fn "
            "to 'package.module:function'"
        ) from e


def rule_rows(cfg: AnnotateConfig, jobs: list[Job], annotator: str, tick) -> list[dict]:
    """Rows from the deterministic rule backend (no reply text, no cache)."""
    rule = load_rule(cfg.rule_fn)
    rows = []
    for job in jobs:
        prompt = {
            k: job.item.get(k) for k in ("prompt_id", "problem", "answer", "solution", "meta")
        }
        ids, label = rule(prompt, [s.text for s in job.segments], job.item["route"])
        parsed = validate_ids(list(ids), len(job.segments), clean_label(label))
        rows.append(finish(cfg, job, annotator, parsed, None, 0.0))
        tick()
    return rows


def dir_fingerprint(path: str) -> str:
    """Cheap identity of a checkpoint directory (names, sizes, mtimes) for the cache key."""
    entries = []
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            entries.append(
                f"{os.path.relpath(os.path.join(root, f), path)}:{st.st_size}:{st.st_mtime_ns}"
            )
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def annotator_name(cfg: AnnotateConfig, model_path: str | None) -> str:
    """The `annotator` column: backend plus what answered."""
    if cfg.backend == "api":
        return f"api:{cfg.api.model}"
    if cfg.backend == "self":
        return f"self:{cfg.self_host.mode}:{model_path}"
    if cfg.backend == "surprise":
        return f"surprise:{model_path}"
    if cfg.backend == "equations":
        return "equations"
    return f"rule:{cfg.rule_fn}"


def summarize(rows: list[dict]) -> dict[str, int]:
    """Row counts by status (for the manifest)."""
    return dict(Counter(r["status"] for r in rows))
