"""annotate_rows: the one entry point the annotate stage calls."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from stages.annotators.api import read_api_key
from stages.annotators.base import (
    Job,
    annotator_name,
    api_transport,
    dir_fingerprint,
    llm_rows,
    prepare,
    rule_rows,
    summarize,
)
from stages.annotators.cache import ReplyCache
from stages.annotators.config import BACKEND_NAMES, AnnotateConfig
from stages.annotators.selfhost import generate_inprocess, served

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
        "the self annotator needs the round's checkpoint: pass model_path=... to annotate_rows "
        f"(items name {len(ckpts)} different checkpoints)"
    )


def _self_rows(
    cfg: AnnotateConfig,
    jobs: list[Job],
    annotator: str,
    tokenizer: Any,
    model_path: str,
    cache: ReplyCache,
    tick: Callable[[], None],
) -> list[dict]:
    """Rows from the round's own policy; vllm_server mode reuses api.* retry/timeout settings."""
    opts = cfg.self_host
    model_id = f"self:{model_path}:{dir_fingerprint(model_path)}"
    if opts.mode == "inprocess":
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
        return llm_rows(cfg, jobs, annotator, model_id, sampling, transport, cache, tick)

    extra = {
        **cfg.api.extra_body,
        "chat_template_kwargs": {"enable_thinking": opts.enable_thinking},
    }

    def lazy_server_transport(requests, on_done):
        # The server starts only when the cache leaves something to ask.
        with served(opts, model_path) as base_url:
            inner, _ = api_transport(
                cfg,
                model=model_path,
                base_url=base_url,
                api_key="EMPTY",
                concurrency=opts.concurrency,
                extra_body=extra,
            )
            return inner(requests, on_done)

    sampling = {
        "mode": "vllm_server",
        "temperature": cfg.temperature,
        "max_tokens": cfg.api.max_tokens,
        "extra_body": extra,
    }
    return llm_rows(cfg, jobs, annotator, model_id, sampling, lazy_server_transport, cache, tick)


def annotate_rows(
    cfg: AnnotateConfig,
    items: list[dict],
    tokenizer: Any,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
    model_path: str | None = None,
) -> list[dict]:
    """Exactly one annotations row per item, in input order.

    items: dicts with rollout_id, route (key|error|none), problem, answer, solution, meta,
    response_text, response_token_ids (and checkpoint, used by backend "self" when
    model_path is not given). tokenizer: the policy's HF tokenizer (decodes the generated ids).
    cache_dir overrides cfg.cache_dir (None in both = no reply cache).
    """
    if cfg.backend not in BACKEND_NAMES:
        raise ValueError(f"annotate.backend={cfg.backend!r}; use one of {BACKEND_NAMES}")
    ckpt = _model_path(model_path, items) if cfg.backend == "self" else model_path
    annotator = annotator_name(cfg, ckpt)
    rows, jobs = prepare(cfg, items, tokenizer, annotator)
    cache = ReplyCache(cache_dir or cfg.cache_dir)
    with _progress(progress, len(jobs)) as tick:
        if not jobs:
            done: list[dict] = []
        elif cfg.backend == "rule":
            done = rule_rows(cfg, jobs, annotator, tick)
        elif cfg.backend == "api":
            transport, sampling = api_transport(
                cfg,
                model=cfg.api.model,
                base_url=cfg.api.base_url,
                api_key=read_api_key(cfg.api.api_key_env),
                concurrency=cfg.api.concurrency,
            )
            done = llm_rows(cfg, jobs, annotator, cfg.api.model, sampling, transport, cache, tick)
        else:
            done = _self_rows(cfg, jobs, annotator, tokenizer, ckpt, cache, tick)
    for job, row in zip(jobs, done, strict=True):
        rows[job.index] = row
    assert all(r is not None for r in rows)
    log.info("annotate (%s): %s", annotator, summarize(rows))
    return rows  # type: ignore[return-value]
