"""Configuration of the annotate stage: which annotator marks spans, and how it is reached.

Defaults follow METHOD.md: a strong API model annotates, span coverage is capped at 25% of the
response tokens. The API key never appears here: only the *name* of the environment variable
that holds it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BACKEND_NAMES = ("api", "self", "rule", "surprise", "equations")
SELF_MODES = ("vllm_server", "inprocess")
TEMPLATE_NAMES = ("system", "key", "error")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ApiOptions(BaseModel):
    """How to reach an OpenAI-compatible chat-completions endpoint."""

    # A key pasted by mistake into a field must not be echoed by the validation error.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    base_url: str | None = Field(
        default=None,
        description="endpoint root (e.g. https://api.openai.com/v1); None = client default",
    )
    model: str = "gpt-4.1"
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="NAME of the environment variable holding the key (the key itself is never "
        "stored in config, shards, manifests or logs)",
    )
    concurrency: int = 32
    http_client: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp",
        description="the SDK's HTTP transport: aiohttp (less CPU per request at high "
        "concurrency) or httpx (the SDK's default)",
    )
    max_retries: int = Field(
        default=6, description="retries after the first try (429/5xx/timeouts)"
    )
    timeout_s: float = Field(default=120.0, description="wall-clock limit of one request")
    backoff_base_s: float = Field(default=1.0, description="first retry delay; doubles per retry")
    backoff_max_s: float = Field(
        default=60.0, description="cap on one retry delay (Retry-After too)"
    )
    max_tokens: int = Field(default=1024, description="reply budget of the annotator")
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        default="max_tokens",
        description="request field carrying max_tokens (OpenAI reasoning models need "
        "max_completion_tokens)",
    )
    send_temperature: bool = Field(
        default=True, description="false for endpoints that reject a temperature (o-series)"
    )
    structured_output: Literal["auto", "json_schema", "vllm", "off"] = Field(
        default="auto",
        description="constrain each reply by its JSON schema: auto (response_format json_schema; "
        "without it if the endpoint rejects it, or when the self annotator thinks first), "
        "json_schema (always), vllm (vLLM's own structured_outputs field), off; with a schema "
        "the reply budget is capped at what the longest valid reply needs",
    )
    extra_body: dict = Field(
        default_factory=dict,
        description="provider-specific request fields (e.g. {'response_format': {'type': "
        "'json_object'}}); part of the cache key",
    )

    @field_validator("structured_output", mode="before")
    @classmethod
    def _yaml_off(cls, v: object) -> object:
        # YAML reads a bare `off` (and `no`) as false: `structured_output=off` must still mean off.
        return "off" if v is False else v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not _ENV_NAME.match(v):
            raise ValueError(
                f"api.api_key_env must be the NAME of an environment variable (e.g. "
                f"OPENAI_API_KEY), not a key; got a value of length {len(v)}"
            )
        return v

    @field_validator("concurrency", "max_tokens")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"api.{info.field_name}={v}: use a positive integer")
        return v

    @field_validator("max_retries")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"api.max_retries={v}: use 0 (no retries) or more")
        return v

    @field_validator("timeout_s", "backoff_base_s", "backoff_max_s")
    @classmethod
    def _positive_seconds(cls, v: float, info) -> float:
        if v <= 0:
            raise ValueError(f"api.{info.field_name}={v}: use a positive number of seconds")
        return v


class SelfOptions(BaseModel):
    """How the round's own policy is served when it annotates (backend: self)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["vllm_server", "inprocess"] = "vllm_server"
    python: str = Field(
        default_factory=lambda: os.environ.get("TRACE_VLLM_PYTHON", sys.executable),
        description="interpreter with vllm installed (vllm_server mode); default: "
        "$TRACE_VLLM_PYTHON (as the rollout engine's vllm.python), else the current interpreter",
    )
    server_module: str = Field(
        default="vllm.entrypoints.openai.api_server",
        description="module run as `python -m <module> --model CKPT --port P`",
    )
    host: str = "127.0.0.1"
    port: int = 8011
    extra_args: list[str] = Field(
        default_factory=list, description="extra server flags, e.g. ['--max-model-len', '16384']"
    )
    startup_timeout_s: float = Field(default=900.0, description="wait this long for /health")
    concurrency: int = Field(default=64, description="parallel requests to the local server")
    enable_thinking: bool = Field(
        default=False, description="chat-template thinking switch for the annotator prompt"
    )
    batch_size: int = Field(default=8, description="sequences per generate call (inprocess)")
    device: str = "cpu"

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 1 <= v <= 65535:
            raise ValueError(f"self_host.port={v}: use a TCP port in 1..65535 (e.g. 8011)")
        return v

    @field_validator("concurrency", "batch_size")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"self_host.{info.field_name}={v}: use a positive integer")
        return v


class SurpriseOptions(BaseModel):
    """The teacher-surprise annotator (backend: surprise): one student and one privileged
    teacher forward of the round's checkpoint per rollout, no prompt, no API."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, description="rollouts per forward")
    device: str = "cpu"
    window_tokens: int = Field(
        default=8, description="length of the token windows chosen by divergence (fewer when "
        "the coverage cap allows fewer)")

    @field_validator("batch_size", "window_tokens")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"surprise.{info.field_name}={v}: use a positive integer")
        return v


class AnnotateConfig(BaseModel):
    """The annotate stage's config (composed into the top-level config by the lead).

    hide_input_in_errors: pydantic applies the setting of the *outermost* model being
    validated, so any config that nests this one must set it too.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    backend: Literal["api", "self", "rule", "surprise", "equations"] = Field(
        default="api",
        description="api (a strong model), self (the round's policy as annotator), rule (a "
        "programmatic rule, rule_fn), surprise (token windows where the privileged teacher's KL "
        "to the student is largest), equations (the arithmetic written in the response checked: "
        "first wrong equation / the equations producing the answer)",
    )
    coverage_cap: float = Field(
        default=0.25, description="max fraction of response tokens inside spans (METHOD.md)"
    )
    max_segment_chars: int = Field(
        default=400, description="longer lines are split at sentence ends, then at this length"
    )
    temperature: float = 0.0
    max_new_tokens: int = Field(default=512, description="reply budget (inprocess self mode)")
    cache_dir: str | None = Field(
        default=None, description="local directory of the reply cache; None = no cache"
    )
    template_dir: str | None = Field(
        default=None,
        description="directory with system.txt, key.txt, error.txt; None = the packaged ones",
    )
    show_solution: bool = Field(
        default=True, description="show the reference solution (when the data has one)"
    )
    max_reference_chars: int = Field(
        default=6000, description="the reference solution is cut to this many chars"
    )
    rule_fn: str = Field(
        default="trace_rl.testbed.rule:rule_annotate",
        description="'module:function' of the rule backend",
    )
    api: ApiOptions = Field(default_factory=ApiOptions)
    self_host: SelfOptions = Field(default_factory=SelfOptions)
    surprise: SurpriseOptions = Field(default_factory=SurpriseOptions)

    @field_validator("coverage_cap")
    @classmethod
    def _cap(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"coverage_cap={v}: use a fraction in (0, 1], e.g. 0.25")
        return v

    @field_validator("max_segment_chars")
    @classmethod
    def _seg(cls, v: int) -> int:
        if v < 20:
            raise ValueError(f"max_segment_chars={v}: use at least 20 (default 400)")
        return v

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"temperature={v}: use 0 (greedy) or a positive value")
        return v

    @field_validator("rule_fn")
    @classmethod
    def _rule(cls, v: str) -> str:
        if v.count(":") != 1:
            raise ValueError(f"rule_fn={v!r}: write it as 'package.module:function'")
        return v

    @model_validator(mode="after")
    def _templates_exist(self) -> AnnotateConfig:
        if self.template_dir is not None:
            missing = [
                n for n in TEMPLATE_NAMES if not (Path(self.template_dir) / f"{n}.txt").is_file()
            ]
            if missing:
                raise ValueError(
                    f"template_dir={self.template_dir!r} lacks "
                    f"{', '.join(m + '.txt' for m in missing)}; "
                    "copy stages/annotators/templates/ and edit it, or set template_dir: null"
                )
        return self
