"""Configuration of the verify stage."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _default_workers() -> int:
    return max(1, os.cpu_count() or 1)


class VerifyConfig(BaseModel):
    """How rollouts are checked against reference answers.

    ``timeout_s`` bounds one item: past it the worker interrupts the item itself (SIGALRM);
    past ``timeout_s + kill_grace_s`` the worker process is killed and replaced. Either way
    the item gets status ``timeout`` and the rest of the batch goes on.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str = "math"
    workers: int = Field(default_factory=_default_workers)
    timeout_s: float = 5.0
    kill_grace_s: float = 2.0
    chunk_size: int = 8
    # forkserver: workers fork from a server that imported sympy once (fast restarts).
    start_method: Literal["spawn", "forkserver"] = "forkserver"
    # math: an exact reference (no decimals in it) also accepts a decimal answer correctly
    # rounded to the decimals it shows, when it shows at least this many; None = off.
    rounded_min_decimals: int | None = 2
    # choice: the option letters a response may pick from.
    choice_letters: str = "ABCD"

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from trace_rl.stages.verifiers.registry import get_verifier  # the package import fills the registry

        get_verifier(v)  # raises, listing the valid kinds
        return v

    @field_validator("workers", "chunk_size")
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (got {v}); use e.g. verify.workers=2")
        return v

    @field_validator("timeout_s")
    @classmethod
    def _positive_timeout(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0 seconds (got {v}); 5 is a good per-item timeout")
        return v

    @field_validator("kill_grace_s")
    @classmethod
    def _nonneg_grace(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"must be >= 0 seconds (got {v})")
        return v

    @field_validator("rounded_min_decimals")
    @classmethod
    def _min_decimals(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 6:
            raise ValueError(f"must be in 1..6 or null to disable (got {v})")
        return v

    @field_validator("choice_letters")
    @classmethod
    def _letters(cls, v: str) -> str:
        if len(v) < 2 or not v.isalpha() or not v.isupper() or len(set(v)) != len(v):
            raise ValueError(f"must be distinct upper-case letters such as 'ABCD' (got {v!r})")
        return v
