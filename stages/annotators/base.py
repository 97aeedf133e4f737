"""annotate_rows: one annotations row per rollout, whatever the backend.

Flow per item: route "none" -> skipped (no call); otherwise segment the response, map tokens
to characters (a mismatch between response_text and response_token_ids -> skipped, with the
reason in `error`, before anything is paid for), ask the backend for segment ids + label,
validate them (parse.py), map them to token spans under the coverage cap (spans.py).

Backends: "api" and "self" produce reply text (through the reply cache), "rule" returns ids
directly. Row statuses: ok | no_spans | parse_error | api_error | timeout | skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import importlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from stages.annotators.align import AlignmentError, token_char_offsets
from stages.annotators.api import ApiCaller, CallResult, call_all, sampling_of
from stages.annotators.cache import ReplyCache, cache_key
from stages.annotators.config import AnnotateConfig
from stages.annotators.parse import ParsedReply, clean_label, parse_reply, validate_ids
from stages.annotators.prompting import build_messages
from stages.annotators.segments import Segment, segment_response
from stages.annotators.spans import build_spans

log = logging.getLogger(__name__)
ROUTES = ("key", "error", "none")


@dataclass
class Job:
    """An item that needs an annotator: its segments; per-token char offsets on demand."""

    index: int
    item: dict
    segments: list[Segment]
    tokenizer: Any
    _offsets: list[tuple[int, int]] | None = None

    def offsets(self) -> list[tuple[int, int]]:
        """token_char_offsets of the response ([T] pairs), computed once.

        Deferred until a reply arrives, so this CPU work overlaps requests in flight.
        """
        if self._offsets is None:
            ids, text = self.item["response_token_ids"], self.item["response_text"]
            self._offsets = token_char_offsets(self.tokenizer, ids, text)
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
        "coverage": float(coverage),
        "status": status,
        "raw_response": raw,
        "error": error,
        "latency_s": float(latency_s),
    }


def _join(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None


def prepare(
    cfg: AnnotateConfig, items: list[dict], tokenizer: Any, annotator: str
) -> tuple[list[dict | None], list[Job]]:
    """Rows decided without an annotator (skipped, empty) and the jobs that need one."""
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
            continue
        text, ids = item["response_text"], list(item["response_token_ids"])
        # Checked before any request is paid for; the exact offsets come later (Job.offsets).
        if not decodes_to(tokenizer, ids, text):
            try:
                token_char_offsets(tokenizer, ids, text)  # for its precise error message
                raise AlignmentError("response_text is not the decoding of response_token_ids")
            except AlignmentError as e:
                rows[i] = make_row(item, annotator, "skipped", error=f"alignment: {e}")
                continue
        segments = segment_response(text, cfg.max_segment_chars)
        if not segments:
            rows[i] = make_row(item, annotator, "no_spans", error="the response is empty")
            continue
        jobs.append(Job(i, item, segments, tokenizer))
    return rows, jobs


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
        offsets,
        job.item["response_text"],
        cfg.coverage_cap,
    )
    status = "ok" if plan.spans else "no_spans"
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


def run_coro(coro: Coroutine) -> Any:
    """Run a coroutine from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


Transport = Callable[[list[list[dict]], Callable[[int, CallResult], None]], list[CallResult]]


def llm_rows(
    cfg: AnnotateConfig,
    jobs: list[Job],
    annotator: str,
    model_id: str,
    sampling: dict,
    transport: Transport,
    cache: ReplyCache,
    tick: Callable[[], None],
) -> list[dict]:
    """Rows of jobs answered by a chat model: cache hits first, the misses via `transport`."""
    messages = [build_messages(cfg, j.item, j.segments) for j in jobs]
    keys = [cache_key(model_id, m, sampling) for m in messages]
    results: list[CallResult | None] = []
    for key in keys:
        raw = cache.get(key)
        results.append(None if raw is None else CallResult(raw, "ok", None, 0.0))
    misses = [i for i, r in enumerate(results) if r is None]
    for _ in range(len(jobs) - len(misses)):
        tick()

    def on_done(k: int, res: CallResult) -> None:
        # Store at once, so a crash later in the run keeps every reply already paid for.
        if res.status == "ok" and res.raw is not None:
            cache.put(keys[misses[k]], res.raw, {"model": model_id})
            with contextlib.suppress(AlignmentError):  # reported by finish()
                jobs[misses[k]].offsets()
        tick()

    if misses:
        for k, res in enumerate(transport([messages[i] for i in misses], on_done)):
            results[misses[k]] = res
    log.info("annotate: %d cache hits, %d requests", len(jobs) - len(misses), len(misses))
    rows = []
    for job, res in zip(jobs, results, strict=True):
        assert res is not None
        if res.status != "ok":
            rows.append(
                make_row(job.item, annotator, res.status, error=res.error, latency_s=res.latency_s)
            )
            continue
        parsed = parse_reply(res.raw or "", len(job.segments))
        rows.append(finish(cfg, job, annotator, parsed, res.raw, res.latency_s))
    return rows


def api_transport(
    cfg: AnnotateConfig,
    *,
    model: str,
    base_url: str | None,
    api_key: str,
    concurrency: int,
    extra_body: dict | None = None,
) -> tuple[Transport, dict]:
    """A transport over an OpenAI-compatible endpoint and the sampling dict of its requests."""
    sampling = sampling_of(cfg.api, cfg.temperature, extra_body)

    def transport(requests: list[list[dict]], on_done) -> list[CallResult]:
        async def go() -> list[CallResult]:
            # The client must be created inside the loop that uses it.
            caller = ApiCaller(
                cfg.api,
                model=model,
                base_url=base_url,
                api_key=api_key,
                temperature=cfg.temperature,
                concurrency=concurrency,
                extra_body=extra_body,
            )
            return await call_all(caller, requests, on_done)

        return run_coro(go())

    return transport, sampling


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
    return f"rule:{cfg.rule_fn}"


def summarize(rows: list[dict]) -> dict[str, int]:
    """Row counts by status (for the manifest)."""
    return dict(Counter(r["status"] for r in rows))
