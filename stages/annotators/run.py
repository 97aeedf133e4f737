"""annotate_rows: the one entry point the annotate stage calls."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from trace_rl.pipeline.fingerprint import model_dir_fingerprint as dir_fingerprint
from trace_rl.stages.annotators.api import read_api_key
from trace_rl.stages.annotators.base import (
    Job,
    annotator_name,
    prepare_jobs,
    rule_rows,
    split_routes,
    summarize,
)
from trace_rl.stages.annotators.cache import ReplyCache
from trace_rl.stages.annotators.config import BACKEND_NAMES, AnnotateConfig
from trace_rl.stages.annotators.replies import api_rows, llm_rows
from trace_rl.stages.annotators.schema import uses_schema
from trace_rl.stages.annotators.selfhost import generate_inprocess, served
from trace_rl.stages.annotators.equations import equation_rows
from trace_rl.stages.annotators.surprise import surprise_rows
from trace_rl.trainer.teacher_prompt import DEFAULT_TEACHER_TEMPLATE

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A tick() that advances a rich progress bar (a no-op when disabled)."""
    if not enabled or total == 0:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("annotate", total=total)
        yield lambda: bar.advance(task)


def _model_path(model_path: str | None, items: list[dict]) -> str:
    """The checkpoint that self-annotates: given, or the one checkpoint the rollouts share."""
    if model_path:
        return model_path
    ckpts = {it.get("checkpoint") for it in items if it.get("route") != "none"}
    if not ckpts:
        return ""  # nothing to annotate: no model is loaded
    if len(ckpts) == 1 and None not in ckpts:
        return ckpts.pop()
    raise ValueError(
        "the self and surprise annotators need the round's checkpoint: pass model_path=... "
        "to annotate_rows "
        f"(items name {len(ckpts)} different checkpoints)"
    )


def _inprocess_rows(
    cfg: AnnotateConfig,
    jobs: list[Job],
    annotator: str,
    tokenizer: Any,
    model_path: str,
    cache: ReplyCache,
    tick: Callable[[], None],
) -> list[dict]:
    """Rows of prepared jobs answered by the round's own policy, generating in this process."""
    opts = cfg.self_host
    transport = generate_inprocess(
        opts,
        model_path,
        tokenizer,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
    )
    sampling = {
        "mode": "inprocess",
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "enable_thinking": opts.enable_thinking,
    }
    model_id = f"self:{model_path}:{dir_fingerprint(model_path)}"
    return llm_rows(cfg, jobs, annotator, model_id, sampling, transport, cache, tick)


def _endpoint_rows(
    cfg: AnnotateConfig,
    jobs: list[Job],
    annotator: str,
    model_path: str | None,
    cache: ReplyCache,
    tick: Callable[[], None],
) -> list[dict]:
    """Rows of (unprepared) jobs from an OpenAI-compatible endpoint: the configured API, or
    (backend self, mode vllm_server) a server on the checkpoint, which reuses api.* retry and
    timeout settings and starts only when the cache leaves something to ask."""
    if cfg.backend == "api":
        return api_rows(
            cfg,
            jobs,
            annotator,
            cfg.api.model,
            cache,
            tick,
            endpoint=lambda: contextlib.nullcontext(cfg.api.base_url),
            model=cfg.api.model,
            api_key=read_api_key(cfg.api.api_key_env),
            concurrency=cfg.api.concurrency,
            structured=uses_schema(cfg.api.structured_output),
        )
    assert model_path
    opts = cfg.self_host
    return api_rows(
        cfg,
        jobs,
        annotator,
        f"self:{model_path}:{dir_fingerprint(model_path)}",
        cache,
        tick,
        endpoint=lambda: served(opts, model_path),
        model=model_path,
        api_key="EMPTY",
        concurrency=opts.concurrency,
        extra_body={
            **cfg.api.extra_body,
            "chat_template_kwargs": {"enable_thinking": opts.enable_thinking},
        },
        structured=uses_schema(cfg.api.structured_output, thinking=opts.enable_thinking),
    )


def annotate_rows(
    cfg: AnnotateConfig,
    items: list[dict],
    tokenizer: Any,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
    model_path: str | None = None,
    teacher_template: str | None = None,
) -> list[dict]:
    """Exactly one annotations row per item, in input order.

    items: dicts with rollout_id, route (key|error|none), problem, answer, solution, meta,
    response_text, response_token_ids (and checkpoint, used by backend "self" when
    model_path is not given). tokenizer: the policy's HF tokenizer (decodes the generated ids).
    cache_dir overrides cfg.cache_dir (None in both = no reply cache). teacher_template: the
    trainer's (train.teacher_template) for backend "surprise", which also reads each item's
    prompt row (`prompt`), prompt_token_ids and sampling when present.
    """
    if cfg.backend not in BACKEND_NAMES:
        raise ValueError(f"annotate.backend={cfg.backend!r}; use one of {BACKEND_NAMES}")
    ckpt = _model_path(model_path, items) if cfg.backend in ("self", "surprise") else model_path
    annotator = annotator_name(cfg, ckpt)
    rows, jobs = split_routes(items, tokenizer, annotator)
    cache = ReplyCache(cache_dir or cfg.cache_dir)
    with _progress(progress, len(jobs)) as tick:
        if not jobs:
            pass
        elif cfg.backend == "api" or (
            cfg.backend == "self" and cfg.self_host.mode == "vllm_server"
        ):
            # Jobs are prepared one by one as their turn comes, overlapping requests.
            done = _endpoint_rows(cfg, jobs, annotator, ckpt, cache, tick)
            _place(jobs, done, rows)
        else:
            ready = prepare_jobs(cfg, jobs, annotator, rows, tick)  # batch backends: up front
            if ready and cfg.backend == "rule":
                _place(ready, rule_rows(cfg, ready, annotator, tick), rows)
            elif ready and cfg.backend == "equations":
                _place(ready, equation_rows(cfg, ready, annotator, tick), rows)
            elif ready and cfg.backend == "surprise":
                template = teacher_template or DEFAULT_TEACHER_TEMPLATE
                done = surprise_rows(cfg, ready, annotator, tokenizer, ckpt, template, tick)
                _place(ready, done, rows)
            elif ready:
                done = _inprocess_rows(cfg, ready, annotator, tokenizer, ckpt, cache, tick)
                _place(ready, done, rows)
    assert all(r is not None for r in rows)
    log.info("annotate (%s): %s", annotator, summarize(rows))
    return rows  # type: ignore[return-value]


def _place(jobs: list[Job], done: list[dict], rows: list) -> None:
    """Write `done` (one row per job) into `rows` at the jobs' places."""
    for job, row in zip(jobs, done, strict=True):
        rows[job.index] = row
