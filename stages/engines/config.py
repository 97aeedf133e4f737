"""Configuration of the rollout stage: which engine samples, and how.

Defaults follow METHOD.md: 8 samples per prompt, temperature 1.0, no top-p/top-k truncation,
thinking mode on for the student.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENGINE_NAMES = ("hf", "vllm")


class HFOptions(BaseModel):
    """Options of the transformers `generate` engine (CPU, tests, the testbed)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int | None = Field(
        default=None,
        description="sequences per generate call; None = as many as `max_batch_tokens` allows",
    )
    max_batch_tokens: int = Field(
        default=1_000_000,
        description="cap on batch_size * (longest prompt + max_tokens) when batch_size is None; "
        "bounds the KV cache so a whole round goes through in as few calls as memory allows",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    num_threads: int | None = Field(
        default=None,
        description="torch CPU threads while generating; None = torch's default. 1 is much "
        "faster on a machine whose cores are busy with other work (OpenMP barriers stall)",
    )

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"hf.batch_size={v}: use a positive integer, or null for automatic")
        return v

    @field_validator("num_threads")
    @classmethod
    def _positive_threads(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"hf.num_threads={v}: use a positive integer, or null for default")
        return v

    @field_validator("max_batch_tokens")
    @classmethod
    def _positive_tokens(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"hf.max_batch_tokens={v}: use a positive integer (e.g. 1000000)")
        return v


class VLLMOptions(BaseModel):
    """Options of the vLLM engine, which runs in its own interpreter (its own venv)."""

    model_config = ConfigDict(extra="forbid")

    python: str = Field(
        default_factory=lambda: os.environ.get("TRACE_VLLM_PYTHON", sys.executable),
        description="interpreter with vllm installed (e.g. .venv-vllm/bin/python); default: "
        "$TRACE_VLLM_PYTHON, else the current interpreter",
    )
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enforce_eager: bool = False
    dtype: str = "auto"
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments passed to vllm.LLM(...)"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment variables for the worker (e.g. VLLM_CPU_KVCACHE_SPACE)",
    )
    timeout_s: float | None = Field(
        default=None, description="kill the worker after this many seconds; None = no limit"
    )
    persistent: bool = Field(
        default=True,
        description="in a multi-round flow, keep one engine up for the whole run and load each "
        "round's checkpoint into it in place (stages/engines/session.py); false = a cold "
        "engine per rollout stage. A standalone rollout stage always starts cold",
    )
    sleep_level: Literal[1, 2] = Field(
        default=2,
        description="vLLM sleep level while the trainer holds the GPU: 1 offloads the weights "
        "to CPU memory, 2 drops them (the next round reloads its checkpoint anyway)",
    )

    @field_validator("tensor_parallel_size", "data_parallel_size")
    @classmethod
    def _positive_parallel(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"parallel size {v}: use 1 or more (1 = no parallelism)")
        return v

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"vllm.gpu_memory_utilization={v}: use a fraction in (0, 1], e.g. 0.9")
        return v


class RolloutConfig(BaseModel):
    """How the rollout stage samples `n` responses for each of `prompts_per_round` prompts."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["hf", "vllm"] = "hf"
    prompts_per_round: int = 32
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 8192
    enable_thinking: bool = True
    seed: int = 0
    hf: HFOptions = Field(default_factory=HFOptions)
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)

    @field_validator("engine", mode="before")
    @classmethod
    def _known_engine(cls, v: Any) -> Any:
        if v not in ENGINE_NAMES:
            raise ValueError(f"unknown rollout engine {v!r}; valid engines: {list(ENGINE_NAMES)}")
        return v

    @field_validator("prompts_per_round", "n", "max_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"value {v}: prompts_per_round, n and max_tokens must be >= 1")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(
                f"temperature={v}: use a value > 0; on-policy RL needs sampling, and the "
                "recorded log-probs are only defined for a sampling distribution"
            )
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"top_p={v}: use a value in (0, 1]; 1.0 turns top-p off")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"top_k={v}: use a positive k, or -1 / 0 to turn top-k off")
        return v

    @model_validator(mode="after")
    def _normalise_top_k(self) -> RolloutConfig:
        # One spelling of "off" so the sampling JSON (and config fingerprints) do not depend on it.
        if self.top_k == 0:
            self.top_k = -1
        return self

    def sampling_dict(self) -> dict[str, Any]:
        """The sampling settings recorded with every rollout (the `sampling` JSON column)."""
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "enable_thinking": self.enable_thinking,
            "seed": self.seed,
        }
