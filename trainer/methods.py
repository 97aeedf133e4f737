"""Training methods registered by name: `grpo`, `self_opd`, `trace`.

A method decides, from the config alone:
- `route`: which annotation a rollout needs before training ("key", "error" or "none"), from the
  route flags and the rollout's correctness. The annotate stage asks this, so the stage and the
  trainer cannot disagree about which rollouts are annotated.
- `plan`: which response tokens are distilled, with which divergence (per rollout, before any
  forward pass);
- `kl_weight`: λ at a global optimizer step;
- `loss`: how per-token quantities combine into the loss of a micro-batch (`(loss, metrics)`);
- `needs_teacher`: whether a step at this λ needs the teacher forward.
Everything else is shared.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.losses import aggregate, clipped_pg_loss, kl_weight

Tensor = torch.Tensor


@dataclass(frozen=True)
class RolloutView:
    """What span planning may look at for one rollout."""

    rollout_id: str
    response_len: int
    correct: bool
    annotation_ok: bool  # annotation status == "ok"
    annotation_route: str  # key | error | none
    spans: list[tuple[int, int, str | None]]  # half-open token spans + type label


@dataclass(frozen=True)
class Plan:
    """Distilled tokens of one rollout: mask [R] and the divergence used on them."""

    mask_R: np.ndarray
    direction: str | None  # forward | reverse | jsd; None when nothing is distilled

    @staticmethod
    def empty(n: int) -> Plan:
        return Plan(np.zeros(n, dtype=bool), None)


@dataclass
class LossInputs:
    """Per-token inputs of one micro-batch; all [B, T] except adv_B."""

    logp_BT: Tensor
    old_logp_BT: Tensor
    adv_B: Tensor
    mask_BT: Tensor  # response tokens
    span_BT: Tensor  # distilled tokens (subset of mask_BT)
    kl_BT: Tensor  # divergence at span tokens, 0 elsewhere
    normaliser: float  # the whole mini-batch's tokens (token_mean) or sequences


ROUTES = ("key", "error", "none")


@dataclass(frozen=True)
class Method:
    route: Callable[[TrainConfig, bool], str]  # (cfg, correct) -> one of ROUTES
    plan: Callable[[TrainConfig, RolloutView], Plan]
    kl_weight: Callable[[TrainConfig, int], float]  # (cfg, global step) -> λ
    loss: Callable[[LossInputs, TrainConfig, float], tuple[Tensor, dict[str, Tensor]]]
    needs_teacher: Callable[[TrainConfig, float], bool]


METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> None:
    METHODS[name] = method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _rng(cfg: TrainConfig, rollout_id: str) -> np.random.Generator:
    # seeded per rollout so a rollout's ablation tokens do not depend on batch order or resume
    return np.random.default_rng([cfg.seed, zlib.crc32(rollout_id.encode())])


def _annotated_mask(view: RolloutView) -> np.ndarray:
    mask_R = np.zeros(view.response_len, dtype=bool)
    for start, end, _ in view.spans:
        mask_R[max(start, 0) : min(end, view.response_len)] = True
    return mask_R


def _routed_direction(cfg: TrainConfig, correct: bool) -> str | None:
    """The divergence the route flags give a rollout of this correctness (METHOD.md "Routing")."""
    if cfg.route.key_forward and correct:
        return "forward"
    if cfg.route.error_reverse and not correct:
        return "reverse"
    return None


_SPANS_OF = {"forward": "key", "reverse": "error"}


def route_trace(cfg: TrainConfig, correct: bool) -> str:
    """Key spans for forward-routed rollouts, error spans for reverse-routed ones. The inverted
    ablation needs the key/error spans to invert them; the random one needs no annotator."""
    direction = _routed_direction(cfg, correct)
    if direction is None or cfg.span_source == "random":
        return "none"
    return _SPANS_OF[direction]


def route_none(cfg: TrainConfig, correct: bool) -> str:
    return "none"


def _trace_direction(cfg: TrainConfig, view: RolloutView) -> str | None:
    direction = _routed_direction(cfg, view.correct)
    if direction is None or cfg.span_source == "random":
        # random: every routed rollout gets its random 25%, annotated or not
        return direction
    wanted = route_trace(cfg, view.correct)
    if not view.annotation_ok or not view.spans or view.annotation_route != wanted:
        return None
    return direction


def plan_trace(cfg: TrainConfig, view: RolloutView) -> Plan:
    """Annotated spans of routed rollouts, or the random / inverted ablation on the same rollouts."""
    direction = _trace_direction(cfg, view)
    n = view.response_len
    if direction is None or n == 0:
        return Plan.empty(n)
    annotated_R = _annotated_mask(view)
    budget = max(1, int(cfg.span_fraction * n))
    if cfg.span_source == "annotated":
        mask_R = annotated_R
    elif cfg.span_source == "random":
        mask_R = np.zeros(n, dtype=bool)
        mask_R[_rng(cfg, view.rollout_id).choice(n, size=min(budget, n), replace=False)] = True
    elif cfg.span_source == "inverted":
        candidates = np.flatnonzero(~annotated_R)
        chosen = _rng(cfg, view.rollout_id).permutation(candidates)[:budget]
        mask_R = np.zeros(n, dtype=bool)
        mask_R[chosen] = True
    else:
        raise ValueError(f"unknown span_source {cfg.span_source!r}")
    return Plan(mask_R, direction if mask_R.any() else None)


def plan_all_tokens(cfg: TrainConfig, view: RolloutView) -> Plan:
    n = view.response_len
    return Plan(np.ones(n, dtype=bool), cfg.self_opd.direction) if n else Plan.empty(n)


def plan_none(cfg: TrainConfig, view: RolloutView) -> Plan:
    return Plan.empty(view.response_len)


def _pieces(x: LossInputs, cfg: TrainConfig, pg_w_BT: Tensor, kl_w_BT: Tensor):
    pg_BT, _ = clipped_pg_loss(x.logp_BT, x.old_logp_BT, x.adv_B, cfg.eps_low, cfg.eps_high)
    agg = lambda t: aggregate(t, x.mask_BT, cfg.loss_agg, normaliser=x.normaliser)
    pg_loss = agg(pg_w_BT * pg_BT)
    kl_loss = agg(kl_w_BT * x.kl_BT)
    loss = pg_loss + kl_loss
    metrics = {"loss": loss.detach(), "pg_loss": pg_loss.detach(), "kl_loss": kl_loss.detach()}
    return loss, metrics


def loss_routed(x: LossInputs, cfg: TrainConfig, lam: float) -> tuple[Tensor, dict[str, Tensor]]:
    """TRACE combination: ℓ off spans, (1 − λ/w0) ℓ + λ D on spans (also self_opd add)."""
    span_BT = x.span_BT.to(x.logp_BT.dtype)
    pg_w_BT = 1.0 - span_BT * (lam / cfg.schedule.w0)
    return _pieces(x, cfg, pg_w_BT, lam * span_BT)


def loss_grpo(x: LossInputs, cfg: TrainConfig, lam: float) -> tuple[Tensor, dict[str, Tensor]]:
    ones_BT = torch.ones_like(x.logp_BT)
    return _pieces(x, cfg, ones_BT, torch.zeros_like(ones_BT))


def loss_self_opd(x: LossInputs, cfg: TrainConfig, lam: float) -> tuple[Tensor, dict[str, Tensor]]:
    if cfg.self_opd.mode == "add":
        return loss_routed(x, cfg, lam)
    # replace (SDPO): the divergence alone, weight 1, no GRPO term
    span_BT = x.span_BT.to(x.logp_BT.dtype)
    return _pieces(x, cfg, torch.zeros_like(span_BT), span_BT)


def lambda_schedule(cfg: TrainConfig, step: int) -> float:
    s = cfg.schedule
    return kl_weight(step, s.w0, s.hold_steps, s.zero_step)


def lambda_zero(cfg: TrainConfig, step: int) -> float:
    return 0.0


def lambda_self_opd(cfg: TrainConfig, step: int) -> float:
    # replace (SDPO): the divergence is the whole loss at weight 1, never annealed
    return 1.0 if cfg.self_opd.mode == "replace" else lambda_schedule(cfg, step)


def _teacher_while_lambda(cfg: TrainConfig, lam: float) -> bool:
    return lam > 0


def _self_opd_teacher(cfg: TrainConfig, lam: float) -> bool:
    return cfg.self_opd.mode == "replace" or lam > 0


register_method("grpo", Method(route_none, plan_none, lambda_zero, loss_grpo,
                                lambda cfg, lam: False))
register_method("trace", Method(route_trace, plan_trace, lambda_schedule, loss_routed,
                                _teacher_while_lambda))
register_method("self_opd", Method(route_none, plan_all_tokens, lambda_self_opd, loss_self_opd,
                                   _self_opd_teacher))
