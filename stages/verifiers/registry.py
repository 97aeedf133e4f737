"""Verdicts and the registry of verifiers (registered by name).

A verifier is built once per process by its factory (so it may keep caches, e.g. parsed
references) and then called once per rollout: ``check(response_text, reference, meta)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from trace_rl.stages.verifiers.config import VerifyConfig

VerdictStatus = Literal["ok", "no_answer", "timeout", "error"]
VERDICT_STATUSES: tuple[str, ...] = ("ok", "no_answer", "timeout", "error")
# Error details are for people reading the verdicts table; keep them short.
DETAIL_MAX_CHARS = 500


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one response; ``correct`` is only ever True with status ok."""

    status: VerdictStatus
    correct: bool = False
    extracted_answer: str | None = None
    detail: str | None = None

    def __post_init__(self) -> None:
        if self.status not in VERDICT_STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}; valid: {VERDICT_STATUSES}")
        if self.correct and self.status != "ok":
            raise ValueError(f"a verdict with status {self.status!r} cannot be correct")

    def to_row(self, rollout_id: str) -> dict[str, Any]:
        """The verdicts-table row (DESIGN.md contract) for this verdict."""
        return {
            "rollout_id": rollout_id,
            "reward": 1.0 if self.correct else 0.0,
            "correct": self.correct,
            "extracted_answer": self.extracted_answer,
            "status": self.status,
            "detail": self.detail,
        }


class CheckFn(Protocol):
    """Checks one response against its reference answer."""

    def __call__(self, response_text: str, reference: str, meta: Mapping[str, Any]) -> Verdict: ...


@dataclass(frozen=True)
class VerifierSpec:
    """A registered verifier: ``make(cfg)`` builds the checker; ``isolate`` runs it in worker
    processes (needed when it uses signals or may hang, as math-verify does); ``preload``
    names heavy modules a fork server imports once for all its workers."""

    name: str
    make: Callable[[VerifyConfig], CheckFn]
    isolate: bool
    preload: tuple[str, ...] = ()


_REGISTRY: dict[str, VerifierSpec] = {}


def register_verifier(
    name: str, *, isolate: bool, preload: tuple[str, ...] = ()
) -> Callable[[Callable[[VerifyConfig], CheckFn]], Callable[[VerifyConfig], CheckFn]]:
    """Decorator registering a checker factory under ``name``."""

    def deco(make: Callable[[VerifyConfig], CheckFn]) -> Callable[[VerifyConfig], CheckFn]:
        if name in _REGISTRY and _REGISTRY[name].make is not make:
            raise ValueError(f"verifier {name!r} is already registered")
        _REGISTRY[name] = VerifierSpec(name=name, make=make, isolate=isolate, preload=preload)
        return make

    return deco


def verifier_names() -> list[str]:
    """Names of all registered verifiers, sorted."""
    return sorted(_REGISTRY)


def get_verifier(name: str) -> VerifierSpec:
    """The verifier registered as ``name``; raises listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown verifier kind {name!r}; valid kinds: {', '.join(verifier_names())}"
        ) from None
