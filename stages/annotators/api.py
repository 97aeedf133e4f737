"""The `api` annotator transport: async OpenAI-compatible chat completions with our own retries.

The client is created with max_retries=0: retries happen here so that the policy is explicit
and tested. Retried: 429 (waiting at least Retry-After / retry-after-ms when the server sends
it), 408, 409, 5xx, timeouts and connection errors; exponential backoff with jitter, capped at
backoff_max_s. Not retried: other 4xx (a bad request or key will not fix itself).
Concurrency is bounded by a semaphore held only while a request is in flight (not while
backing off). A reply's latency counts from its first try sent (not time queued for a slot)
to its final outcome, backoff included. The API key is read from the environment by name and
scrubbed from every error string this module produces. A request that carries the reply's JSON
schema and is rejected for it is sent again without it when the caller allows the fallback.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # openai is imported where it is used: a run without an API annotator
    import openai  # (rule, surprise) never pays its ~1.5 s import

from trace_rl.stages.annotators.config import ApiOptions
from trace_rl.stages.annotators.schema import schema_rejected

log = logging.getLogger(__name__)
RETRY_STATUS = (408, 409, 429)


@dataclass(frozen=True)
class CallResult:
    """One request's outcome: raw reply text when status is ok, else the failure."""

    raw: str | None
    status: str  # ok | api_error | timeout
    error: str | None
    latency_s: float


def read_api_key(env_name: str) -> str:
    """The key from the named environment variable; the error names the variable, not a value."""
    key = os.environ.get(env_name)
    if not key:
        raise RuntimeError(
            f"environment variable {env_name} is not set: export the annotator API key in it "
            "(or set annotate.api.api_key_env to the variable that holds it)"
        )
    return key


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced."""
    return text.replace(secret, "[REDACTED]") if secret else text


def retry_after_s(err: openai.APIStatusError) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, retry-after seconds or HTTP date)."""
    headers = err.response.headers if err.response is not None else {}
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def classify(err: BaseException) -> tuple[bool, str]:
    """(retryable, final status if it is the last failure) for one failed try."""
    import openai

    if isinstance(err, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
        return True, "timeout"
    if isinstance(err, openai.APIConnectionError):
        return True, "api_error"
    if isinstance(err, openai.APIStatusError):
        return err.status_code in RETRY_STATUS or err.status_code >= 500, "api_error"
    return False, "api_error"


def describe(err: BaseException) -> str:
    """A short, key-free description of a failure."""
    status = getattr(err, "status_code", None)
    head = type(err).__name__ + (f" (HTTP {status})" if status else "")
    body = str(err).strip()
    return f"{head}: {body[:300]}" if body else head


def http_client(name: str):
    """The SDK's HTTP client by name: its aiohttp transport, or its default httpx one.

    aiohttp is the SDK's documented choice for high concurrency: on 2 cores it cut the client's
    CPU per request from ~3.3 ms to ~2.2 ms (benchmarks/annotate_throughput.py).
    """
    import openai

    if name == "httpx":
        return openai.DefaultAsyncHttpxClient()
    try:
        return openai.DefaultAioHttpClient()
    except RuntimeError as e:  # the SDK raises this when aiohttp is not installed
        raise RuntimeError(
            "annotate.api.http_client=aiohttp needs the aiohttp extra of openai: "
            "pip install 'openai[aiohttp]' (or set annotate.api.http_client=httpx)"
        ) from e


def sampling_of(opts: ApiOptions, temperature: float, extra_body: dict | None) -> dict:
    """The request fields that change a reply (part of the cache key)."""
    body = dict(opts.extra_body if extra_body is None else extra_body)
    fields = {opts.max_tokens_param: opts.max_tokens, **body}
    if opts.send_temperature:
        fields["temperature"] = temperature
    return fields


class ApiCaller:
    """Sends chat requests to one endpoint with bounded concurrency and retries."""

    def __init__(
        self,
        opts: ApiOptions,
        *,
        model: str,
        base_url: str | None,
        api_key: str,
        temperature: float,
        concurrency: int,
        extra_body: dict | None = None,
        schema_fallback: bool = False,
    ):
        self.opts = opts
        # Whether a request that the endpoint rejects for its schema fields is sent again
        # without them (structured_output: auto); once rejected, no request carries them.
        self.schema_fallback = schema_fallback
        self.schema_ok = True
        self.model = model
        self.temperature = temperature
        self.extra_body = dict(opts.extra_body if extra_body is None else extra_body)
        self._key = api_key
        self._sampling = self.sampling()
        self._sem = asyncio.Semaphore(concurrency)
        import openai

        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=opts.timeout_s,
            http_client=http_client(opts.http_client),
        )

    def sampling(self) -> dict:
        """The request fields that change a reply (part of the cache key)."""
        return sampling_of(self.opts, self.temperature, self.extra_body)

    async def _try_once(self, messages: list[dict], started: list[float], fields: dict) -> str:
        async with self._sem:
            # Decided once a slot is ours: a rejection seen while queued already counts.
            use = fields if self.schema_ok else {}
            body = {"model": self.model, "messages": messages, **self._sampling, **use}
            if not started:  # latency counts from the first try sent, not from queueing
                started.append(time.perf_counter())
            # client.post is the SDK's documented raw-request path (auth, timeouts and error
            # classes as in create()); it skips the typed param transform and response models,
            # which cost several ms of CPU per request and capped throughput at high concurrency.
            data = await asyncio.wait_for(
                self._client.post("/chat/completions", cast_to=object, body=body),
                # The client's own timeout is per read; this bounds the whole request.
                timeout=self.opts.timeout_s,
            )
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(
                f"the reply is not a chat completion (no choices[0].message: {e!r})"
            ) from e
        return content if isinstance(content, str) else ""

    def _delay(self, attempt: int, err: BaseException) -> float:
        import openai

        backoff = self.opts.backoff_base_s * (2**attempt) * random.uniform(0.5, 1.0)
        if isinstance(err, openai.APIStatusError):
            asked = retry_after_s(err)
            if asked is not None:
                backoff = max(backoff, asked)
        return min(backoff, self.opts.backoff_max_s)

    def _drop_schema(self, err: BaseException, fields: dict) -> bool:
        """True when `err` says the endpoint does not take the schema fields and we may go on
        without them (this request and every later one)."""
        if not (fields and self.schema_fallback and schema_rejected(err)):
            return False
        if self.schema_ok:  # the first rejection: said once
            log.warning("the annotator endpoint rejects structured outputs (%s); asking without "
                        "a schema from now on (annotate.api.structured_output=off skips the try)",
                        redact(describe(err), self._key)[:200])
        self.schema_ok = False
        return True

    async def call(self, messages: list[dict], fields: dict | None = None) -> CallResult:
        """One reply, retried per the module policy; never raises for transport failures.
        `fields`: per-request body fields (the reply's schema and its token cap)."""
        started: list[float] = []
        fields = dict(fields or {})

        def latency() -> float:
            return time.perf_counter() - started[0] if started else 0.0

        last_status, last_error = "api_error", "no attempt made"
        attempt = 0
        while attempt <= self.opts.max_retries:
            try:
                raw = await self._try_once(messages, started, fields)
                return CallResult(redact(raw, self._key), "ok", None, latency())
            except Exception as err:  # noqa: BLE001 - every failure becomes a row status
                if self._drop_schema(err, fields):
                    fields = {}
                    continue  # the same try without the schema: not counted as a retry
                retryable, last_status = classify(err)
                last_error = redact(f"attempt {attempt + 1}: {describe(err)}", self._key)
                if not retryable or attempt == self.opts.max_retries:
                    break
                await asyncio.sleep(self._delay(attempt, err))
            attempt += 1
        return CallResult(None, last_status, last_error, latency())

    async def close(self) -> None:
        await self._client.close()
