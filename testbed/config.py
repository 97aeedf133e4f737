"""Configuration of the CPU testbed: task difficulty, tokenizer, tiny model, warm start, eval."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from trace_rl.trainer.teacher_prompt import DEFAULT_TEACHER_TEMPLATE


class TestbedConfig(BaseModel):
    """Everything that determines a testbed build; its fingerprint keys the build cache.

    Defaults give the embedded demo: column addition of 1- to 3-digit numbers, a 2-layer
    Qwen3 with hidden size 128 (0.4M parameters), warm-started by 600 SFT steps of 16 examples
    so that held-out student accuracy at temperature 1 is middling and the privileged
    teacher's is higher.
    """

    model_config = ConfigDict(extra="forbid")
    __test__ = False  # keep pytest from collecting this class (its name starts with "Test")

    # --- task ---------------------------------------------------------------------------
    min_digits: int = Field(1, ge=1, le=12, description="fewest digits of an operand")
    max_digits: int = Field(3, ge=1, le=12, description="most digits of an operand")
    task: Literal["column_addition", "digit_chain"] = Field(
        "column_addition",
        description="column_addition (the demo; digits fields apply) or digit_chain (the "
        "long-chain task of testbed.chain: 8-11 dependent steps, spans on the kept digits)",
    )
    step_layout: Literal["line", "split"] = Field(
        "line",
        description="line: one line per step (the demo); split: the written digit and carry on a "
        "line of their own, so rule-annotator spans are the deciding tokens (long-chain task)",
    )
    heldout_mod: int = Field(
        10, ge=2, description="a problem is held out iff hash(problem) % heldout_mod == 0"
    )
    # --- tokenizer ----------------------------------------------------------------------
    vocab_size: int = Field(512, ge=270, le=4096, description="BPE vocabulary (bytes + merges)")
    tokenizer_corpus_size: int = Field(1000, ge=50, description="problems used to train BPE")
    # --- model --------------------------------------------------------------------------
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=16)
    max_position_embeddings: int = Field(512, ge=64)
    # --- warm start (SFT) ---------------------------------------------------------------
    sft_steps: int = Field(600, ge=1)
    sft_batch_size: int = Field(16, ge=1)
    sft_lr: float = Field(3e-3, gt=0)
    sft_warmup_steps: int = Field(30, ge=0)
    sft_weight_decay: float = Field(0.0, ge=0)
    sft_num_problems: int = Field(20000, ge=1, description="distinct training problems")
    privileged_frac: float = Field(
        0.5, ge=0, le=1, description="fraction of SFT examples in the teacher (privileged) format"
    )
    label_frac: float = Field(
        0.5, ge=0, le=1, description="fraction of privileged examples with 'Watch out for: ...'"
    )
    corrupt_frac: float = Field(
        0.3,
        ge=0,
        le=1,
        description="fraction of student-format SFT targets with one injected arithmetic error; "
        "the main knob that sets the warm start's student accuracy",
    )
    enable_thinking: bool = Field(
        False, description="chat template thinking mode used for SFT (and so for rollouts)"
    )
    # The trainer's teacher template (TraceConfig refuses a testbed whose template differs).
    teacher_template: str = DEFAULT_TEACHER_TEMPLATE
    # --- evaluation ---------------------------------------------------------------------
    eval_size: int = Field(256, ge=0, description="held-out problems for the build's accuracy")
    eval_max_new_tokens: int = Field(192, ge=8)
    eval_batch_size: int = Field(128, ge=1)
    seed: int = 0

    @field_validator("teacher_template")
    @classmethod
    def _template_has_fields(cls, v: str) -> str:
        if "{problem}" not in v or "{context}" not in v:
            raise ValueError(
                "teacher_template must contain both '{problem}' and '{context}' "
                f"(the default is {DEFAULT_TEACHER_TEMPLATE!r}); got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _check_consistency(self) -> TestbedConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"min_digits ({self.min_digits}) must be <= max_digits ({self.max_digits})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}); e.g. set num_heads to a divisor of hidden_size"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        return self

    def _fields(self) -> dict[str, Any]:
        """Every field, less those added since builds were first cached when they hold their
        default: a default build keeps the fingerprint (and so the cache key) it always had."""
        fields = self.model_dump(mode="json")
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        return fields

    def config_fingerprint(self) -> str:
        """Stable hex digest of every field (the config alone, whatever the environment)."""
        blob = json.dumps(self._fields(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprint(self, environment: dict[str, str] | None = None) -> str:
        """Hex digest of every field and of what else the weights depend on (`build_environment`:
        library versions, the CPU kernels in use, the build's thread count); it keys the build
        cache. Equal fingerprints give byte-identical builds (docs/testbed_results.md)."""
        env = build_environment() if environment is None else environment
        blob = json.dumps({"config": self._fields(), "environment": env},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Fields added after the first cached builds, with their defaults (left out of the fingerprint).
_LATER_FIELDS: dict[str, Any] = {"step_layout": "line", "task": "column_addition"}

# The long-chain task (issue 30): the digit chain of testbed.chain, 8-11 dependent steps where one
# slip fails the answer, each step's kept digit on a line of its own. corrupt_frac sets the
# student's slip rate; the measured builds are in docs/testbed_results.md ("The long-chain
# testbed"). (Column addition of 8-9 digit operands, `step_layout: split`, was tried first: the
# warm start does not learn to read the j-th digit of a long operand in minutes, 0% / 0%.)
LONG_CHAIN: dict[str, Any] = {
    "task": "digit_chain",
    "corrupt_frac": 0.8,
    "eval_max_new_tokens": 256,
}


def long_chain_overrides(prefix: str = "model.testbed.") -> list[str]:
    """LONG_CHAIN as `section.key=value` overrides of the run config."""
    return [f"{prefix}{k}={v}" for k, v in LONG_CHAIN.items()]


# The build runs on this many torch threads, whatever the caller set: CPU matmuls split across
# threads sum in a different order, so the same config on 1 and on 2 threads trains different weights.
BUILD_THREADS = 1
# Libraries whose version can change a build's bytes: torch (kernels, init, optimizer), transformers
# (the model code, its init and save format), tokenizers (BPE training), safetensors (the file).
BUILD_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")


def build_environment() -> dict[str, str]:
    """What besides the config a build's bytes depend on: the versions of BUILD_LIBRARIES, the CPU
    instruction set torch dispatches its kernels to (AVX2 and AVX-512 kernels round differently)
    and the build's fixed thread count."""
    from importlib.metadata import version

    import torch

    env = {name: version(name) for name in BUILD_LIBRARIES}
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["build_threads"] = str(BUILD_THREADS)
    return env
