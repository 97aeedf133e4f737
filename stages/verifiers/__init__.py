"""Verifiers: reward a rollout by checking its answer against the reference (verify stage)."""

from trace_rl.stages.verifiers.registry import (
    VERDICT_STATUSES,
    CheckFn,
    Verdict,
    VerifierSpec,
    get_verifier,
    register_verifier,
    verifier_names,
)

# Importing the verifier modules registers them by name.
from trace_rl.stages.verifiers import choice, math_verifier, testbed  # noqa: F401  isort: skip
from trace_rl.stages.verifiers.config import VerifyConfig
from trace_rl.stages.verifiers.run import VerifierPool, verify_rows

__all__ = [
    "VERDICT_STATUSES",
    "CheckFn",
    "Verdict",
    "VerifierPool",
    "VerifierSpec",
    "VerifyConfig",
    "get_verifier",
    "register_verifier",
    "verifier_names",
    "verify_rows",
]
