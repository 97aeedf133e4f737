"""Backends that answer with reply text: a batch transport (the inprocess self annotator) and
an OpenAI-compatible endpoint (the api annotator, and the self annotator's vLLM server).

Both look replies up in the reply cache first and store each new reply the moment it arrives,
so a crash keeps every reply already paid for. Over an endpoint, requests carry a JSON schema
of the reply where `api.structured_output` asks for one (schema.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from trace_rl.stages.annotators.api import ApiCaller, CallResult, sampling_of
from trace_rl.stages.annotators.base import Job, finish, make_row
from trace_rl.stages.annotators.cache import ReplyCache, cache_key
from trace_rl.stages.annotators.config import AnnotateConfig
from trace_rl.stages.annotators.parse import parse_reply
from trace_rl.stages.annotators.prompting import build_messages
from trace_rl.stages.annotators.schema import schema_fields

log = logging.getLogger(__name__)


def run_coro(coro: Coroutine) -> Any:
    """Run a coroutine from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


Transport = Callable[[list[list[dict]], Callable[[int, CallResult], None]], list[CallResult]]


def row_of(cfg: AnnotateConfig, job: Job, annotator: str, res: CallResult) -> dict:
    """The row of a job from its reply (or its transport failure)."""
    if res.status != "ok":
        return make_row(job.item, annotator, res.status, error=res.error, latency_s=res.latency_s)
    parsed = parse_reply(res.raw or "", len(job.segments))
    return finish(cfg, job, annotator, parsed, res.raw, res.latency_s)


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
    """Rows of prepared jobs answered by a batch transport: cache hits first, then the misses.

    A reply is stored in the cache and turned into its row as soon as it arrives. Jobs with the
    same request (duplicate rollouts) share one request and its reply, as they share one cache
    entry: a run that requested them writes the rows that its cached rerun writes.
    """
    messages = [build_messages(cfg, j.item, j.segments) for j in jobs]
    keys = [cache_key(model_id, m, sampling) for m in messages]
    rows: list[dict | None] = [None] * len(jobs)
    sharing: dict[str, list[int]] = {}  # request key -> the jobs it answers, not in the cache
    for i, key in enumerate(keys):
        hit = cache.lookup(key) if key not in sharing else None
        if hit is None:
            sharing.setdefault(key, []).append(i)
        else:
            rows[i] = row_of(cfg, jobs[i], annotator, CallResult(hit[0], "ok", None, hit[1]))
            tick()
    misses = [same[0] for same in sharing.values()]

    def answer(i: int, res: CallResult) -> None:
        for j in sharing[keys[i]]:
            if rows[j] is None:
                rows[j] = row_of(cfg, jobs[j], annotator, res)
                tick()

    def on_done(k: int, res: CallResult) -> None:
        i = misses[k]
        # Store at once, so a crash later in the run keeps every reply already paid for.
        if res.status == "ok" and res.raw is not None:
            cache.put(keys[i], res.raw, {"model": model_id, "latency_s": res.latency_s})
        answer(i, res)

    if misses:
        results = transport([messages[i] for i in misses], on_done)
        for i, res in zip(misses, results, strict=True):
            answer(i, res)  # for a transport that did not report this one as it finished
    log.info("annotate: %d cache hits, %d requests", len(jobs) - sum(map(len, sharing.values())), len(misses))
    assert all(r is not None for r in rows)
    return rows  # type: ignore[return-value]


async def run_windowed(fn: Callable[[int], Awaitable[None]], n: int, window: int) -> None:
    """Await fn(0), ..., fn(n - 1), started in order with at most `window` unfinished at once.

    The first exception cancels the rest and propagates.
    """
    running: set[asyncio.Task] = set()

    async def reap() -> None:
        nonlocal running
        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    try:
        for k in range(n):
            if len(running) >= window:
                await reap()
            running.add(asyncio.create_task(fn(k)))
        while running:
            await reap()
    except BaseException:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise


def api_rows(
    cfg: AnnotateConfig,
    jobs: list[Job],
    annotator: str,
    model_id: str,
    cache: ReplyCache,
    tick: Callable[[], None],
    *,
    endpoint: Callable[[], contextlib.AbstractContextManager[str | None]],
    model: str,
    api_key: str,
    concurrency: int,
    extra_body: dict | None = None,
    structured: bool = False,
) -> list[dict]:
    """Rows of (unprepared) jobs answered over an OpenAI-compatible endpoint.

    Each job runs as one pipeline: prepare, cache lookup, request on a miss (the reply cached at
    once, so a crash keeps every reply paid for), parse and span mapping. Jobs start in order,
    at most 2 x concurrency at a time, so the CPU work of one overlaps the requests of others
    rather than preceding them all. `endpoint()` yields the base URL; it is entered at the
    first cache miss only (for the self annotator it starts a server on the checkpoint).
    `structured`: each request carries the JSON schema of its reply (`api.structured_output`;
    in mode `auto` an endpoint that rejects the schema is asked again without it).
    """
    sampling = sampling_of(cfg.api, cfg.temperature, extra_body)
    mode = cfg.api.structured_output
    rows: list[dict | None] = [None] * len(jobs)
    hits = 0
    asking: dict[str, asyncio.Task[CallResult]] = {}  # request key -> its one request

    async def go() -> None:
        nonlocal hits
        stack = contextlib.ExitStack()
        opening: asyncio.Task[ApiCaller] | None = None

        async def open_caller() -> ApiCaller:
            base_url = await asyncio.to_thread(stack.enter_context, endpoint())
            # The client must be created inside the loop that uses it.
            return ApiCaller(
                cfg.api,
                model=model,
                base_url=base_url,
                api_key=api_key,
                temperature=cfg.temperature,
                concurrency=concurrency,
                extra_body=extra_body,
                schema_fallback=mode == "auto",
            )

        async def request(key: str, messages: list[dict], fields: dict) -> CallResult:
            nonlocal opening
            if opening is None:  # opened once; a failure reaches every waiter
                opening = asyncio.create_task(open_caller())
            res = await (await asyncio.shield(opening)).call(messages, fields)
            if res.status == "ok" and res.raw is not None:
                cache.put(key, res.raw, {"model": model_id, "latency_s": res.latency_s})
            return res

        async def one(k: int) -> None:
            nonlocal hits
            job = jobs[k]
            row = job.prepare(cfg, annotator)
            if row is None:
                messages = build_messages(cfg, job.item, job.segments)
                fields = (schema_fields(mode, len(job.segments), cfg.api.max_tokens,
                                        cfg.api.max_tokens_param) if structured else {})
                key = cache_key(model_id, messages, {**sampling, **fields})
                hit = cache.lookup(key) if key not in asking else None
                if hit is not None:
                    hits += 1
                    res = CallResult(hit[0], "ok", None, hit[1])
                else:
                    # Jobs with the same request (duplicate rollouts) share one request and its
                    # reply, as they share one cache entry: the run that asks writes the rows
                    # that its cached rerun writes.
                    if key not in asking:
                        asking[key] = asyncio.create_task(request(key, messages, fields))
                    res = await asyncio.shield(asking[key])
                row = row_of(cfg, job, annotator, res)
            rows[k] = row
            tick()

        try:
            await run_windowed(one, len(jobs), 2 * concurrency)
        finally:
            if (
                opening is not None
                and opening.done()
                and not opening.cancelled()
                and opening.exception() is None
            ):
                await opening.result().close()
            await asyncio.to_thread(stack.close)

    if jobs:
        run_coro(go())
    log.info("annotate: %d cache hits, %d requests", hits, len(asking))
    assert all(r is not None for r in rows)
    return rows  # type: ignore[return-value]
