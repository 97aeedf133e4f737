"""Dense reference loss functions (DESIGN.md "The loss contract").

Pure functions on small tensors; the memory-lean path (trainer/lean.py) reuses `token_kl` chunk by
chunk and is tested against these on whole sequences.

Bounding the per-token divergence (`bound`, docs/method.md "The bound on D_t"):
- "token_scale" (default): D_t * sg(min(1, c / D_t)). The value is capped at c nats per token and
  the gradient is D_t's own, scaled by a non-negative detached factor, so it keeps its direction.
- "none": the unbounded divergence.
- "per_term_clip": the literal reading of the paper's "each per-vocabulary term clipped pointwise
  at 0.05": every summand is clamped from above, term_v <- min(term_v, c). GRADIENT-REVERSING: a
  clamped summand loses its pull while the softmax normaliser inside the unclamped summands keeps
  pushing, so descent can lower exactly the tokens the teacher supports (tests/test_losses.py
  measures it). Kept only as an opt-in for faithfulness experiments.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

DIRECTIONS = ("forward", "reverse", "jsd")
AGG_MODES = ("token_mean", "seq_mean_token_mean")
KL_SUPPORTS = ("full", "topk")
KL_BOUNDS = ("token_scale", "none", "per_term_clip")


def bound_token_kl(kl_N: Tensor, c: float) -> Tensor:
    """D_t * sg(min(1, c / D_t)) [N]: at most c in value, gradient direction of D_t unchanged.

    The factor is detached, so d(out)/dθ = factor * dD_t/dθ with factor in (0, 1]; a divergence
    that is <= c (or a tiny negative from rounding) passes through unchanged.
    """
    with torch.no_grad():
        factor_N = c / kl_N.clamp(min=c)
    return kl_N * factor_N


def topk_bucket_logprobs(
    student_logits_NV: Tensor, teacher_logits_NV: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Restrict both distributions to the union of the student's and the teacher's top-k ids
    plus one tail bucket holding the rest of each distribution's mass.

    Returns log-probs [N, 2k+1] for student and teacher: 2k candidate columns (the student's top-k,
    then the teacher's), of which a teacher id already among the student's is a dead column
    (log-prob -1e4 in both, so it adds nothing to any divergence or mass), and last
    log(1 - Σ union mass). The teacher's ids matter for forward KL, whose weight is the teacher's:
    with the student's ids alone, teacher mass the student does not rank would fall into the tail
    and go unseen. The ids are chosen without gradient (a selection, not a function to
    differentiate).
    """
    s_logp_NV = student_logits_NV.float().log_softmax(-1)
    t_logp_NV = teacher_logits_NV.float().log_softmax(-1)
    k = min(k, s_logp_NV.shape[-1] - 1)
    with torch.no_grad():
        s_ids_NK = s_logp_NV.topk(k, dim=-1).indices
        t_ids_NK = t_logp_NV.topk(k, dim=-1).indices
        dup_NK = (t_ids_NK[:, :, None] == s_ids_NK[:, None, :]).any(-1)
        ids_N2K = torch.cat([s_ids_NK, t_ids_NK], dim=-1)
        dead_N2K = torch.cat([torch.zeros_like(dup_NK), dup_NK], dim=-1)

    def with_tail(logp_NV: Tensor) -> Tensor:
        top_N2K = logp_NV.gather(-1, ids_N2K).masked_fill(dead_N2K, -1e4)
        mass_N1 = top_N2K.logsumexp(-1, keepdim=True)
        # log(1 - exp(m)) computed stably; clamp keeps the tail finite when the union holds all mass
        tail_N1 = torch.log(-torch.expm1(mass_N1.clamp(max=-1e-7)))
        return torch.cat([top_N2K, tail_N1], dim=-1)

    return with_tail(s_logp_NV), with_tail(t_logp_NV)


def kl_from_logprobs(
    s_logp_NV: Tensor,
    t_logp_NV: Tensor,
    direction: str,
    term_clip: float | None = None,
    beta: float = 0.5,
) -> Tensor:
    """Per-token divergence [N] between student (s) and teacher (t) log-probs [N, V].

    forward = KL(t‖s) = Σ_v t_v (log t_v − log s_v); reverse = KL(s‖t);
    jsd = β KL(t‖m) + (1−β) KL(s‖m) with m = β t + (1−β) s.
    `term_clip` clamps every summand from above (the gradient-reversing per-term reading; None = off).
    """
    if direction == "forward":
        terms_NV = t_logp_NV.exp() * (t_logp_NV - s_logp_NV)
    elif direction == "reverse":
        terms_NV = s_logp_NV.exp() * (s_logp_NV - t_logp_NV)
    elif direction == "jsd":
        log_m_NV = torch.logsumexp(
            torch.stack([t_logp_NV + torch.log(torch.tensor(beta)),
                         s_logp_NV + torch.log(torch.tensor(1.0 - beta))]),
            dim=0,
        )
        terms_NV = beta * t_logp_NV.exp() * (t_logp_NV - log_m_NV) + (1.0 - beta) * (
            s_logp_NV.exp() * (s_logp_NV - log_m_NV)
        )
    else:
        raise ValueError(f"unknown KL direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if term_clip is not None:
        terms_NV = terms_NV.clamp(max=term_clip)
    return terms_NV.sum(-1)


def token_kl_and_raw(
    student_logits: Tensor,
    teacher_logits: Tensor,
    direction: str,
    *,
    bound: str = "none",
    c: float = 1.0,
    beta: float = 0.5,
    support: str = "full",
    topk: int = 20,
) -> tuple[Tensor, Tensor]:
    """(bounded D_t [N] for the loss, unbounded D_t [N] detached for metrics); see `token_kl`."""
    if bound not in KL_BOUNDS:
        raise ValueError(f"unknown kl_bound {bound!r}; valid: {', '.join(KL_BOUNDS)}")
    if support == "full":
        s_logp_NV = student_logits.float().log_softmax(-1)
        t_logp_NV = teacher_logits.float().log_softmax(-1)
    elif support == "topk":
        s_logp_NV, t_logp_NV = topk_bucket_logprobs(student_logits, teacher_logits, topk)
    else:
        raise ValueError(f"unknown kl_support {support!r}; valid: {', '.join(KL_SUPPORTS)}")
    raw_N = kl_from_logprobs(s_logp_NV, t_logp_NV, direction, None, beta)
    if bound == "token_scale":
        return bound_token_kl(raw_N, c), raw_N.detach()
    if bound == "per_term_clip":
        return kl_from_logprobs(s_logp_NV, t_logp_NV, direction, c, beta), raw_N.detach()
    return raw_N, raw_N.detach()


def token_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    direction: str,
    *,
    bound: str = "none",
    c: float = 1.0,
    beta: float = 0.5,
    support: str = "full",
    topk: int = 20,
) -> Tensor:
    """Per-token divergence [N] from logits [N, V] (computed in float32), bounded by `bound`.

    `support="topk"` replaces the vocabulary by the union of the student's and the teacher's
    top-k ids plus one tail bucket.
    `bound` (one of KL_BOUNDS) with its constant `c`: "token_scale" caps each token's value at c
    keeping the gradient's direction; "per_term_clip" clamps each vocabulary term at c
    (gradient-reversing, faithfulness experiments only); "none" leaves D_t alone.
    """
    return token_kl_and_raw(student_logits, teacher_logits, direction, bound=bound, c=c,
                            beta=beta, support=support, topk=topk)[0]


def kl_weight(step: int, w0: float = 0.5, hold_steps: int = 10, zero_step: int = 40) -> float:
    """λ at global optimizer step `step`: w0 while step < hold_steps, linear decay, 0 from zero_step."""
    if step < hold_steps:
        return float(w0)
    if step >= zero_step:
        return 0.0
    return float(w0) * (zero_step - step) / (zero_step - hold_steps)


def grpo_advantages(
    rewards: Tensor, group_ids: Tensor | list, norm_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages [B] from rewards [B] and group ids [B] (ints or strings).

    (r − group mean) / (unbiased group std + eps) with norm_std, else r − group mean (Dr.GRPO).
    A group of one has no baseline to compare against and gets 0.
    """
    rewards_B = torch.as_tensor(rewards, dtype=torch.float32)
    keys = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    gid_B = torch.tensor([index[key] for key in keys], dtype=torch.long)
    n_groups = len(index)
    count_G = torch.zeros(n_groups).index_add_(0, gid_B, torch.ones_like(rewards_B))
    mean_G = torch.zeros(n_groups).index_add_(0, gid_B, rewards_B) / count_G
    centred_B = rewards_B - mean_G[gid_B]
    if norm_std:
        sq_G = torch.zeros(n_groups).index_add_(0, gid_B, centred_B**2)
        std_G = (sq_G / (count_G - 1).clamp(min=1)).sqrt()
        centred_B = centred_B / (std_G[gid_B] + eps)
    return torch.where(count_G[gid_B] > 1, centred_B, torch.zeros_like(centred_B))


def clipped_pg_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float = 0.2, eps_high: float = 0.28
) -> tuple[Tensor, Tensor]:
    """DAPO clip-higher per-token loss ℓ [B, T] and a bool [B, T] marking clipped tokens."""
    adv_B1 = advantages.reshape(-1, 1).to(logp.dtype)
    ratio_BT = torch.exp(logp - old_logp)
    unclipped_BT = ratio_BT * adv_B1
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_B1
    loss_BT = -torch.minimum(unclipped_BT, clipped_BT)
    return loss_BT, (clipped_BT < unclipped_BT).detach()


def routed_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    kl: Tensor,
    span_mask: Tensor,
    lam: float,
    w0: float,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> Tensor:
    """Per-token TRACE loss [B, T]: ℓ_t off spans, (1 − lam/w0)·ℓ_t + lam·kl_t on spans.

    logp, old_logp, kl, span_mask: [B, T]; advantages: [B] (broadcast over tokens).
    """
    pg_BT, _ = clipped_pg_loss(logp, old_logp, advantages, eps_low, eps_high)
    span_BT = span_mask.to(torch.bool)
    on_span_BT = (1.0 - lam / w0) * pg_BT + lam * kl
    return torch.where(span_BT, on_span_BT, pg_BT)


def aggregate(
    loss_bt: Tensor, mask_bt: Tensor, mode: str, *, normaliser: float | None = None
) -> Tensor:
    """Reduce a per-token loss [B, T] under mask [B, T] to a scalar.

    token_mean: Σ loss / Σ mask (DAPO); seq_mean_token_mean: mean over sequences of each
    sequence's token mean. `normaliser` (the mini-batch's total tokens, resp. sequences) replaces
    the local denominator so that micro-batch sums add up to the same value however split.
    """
    mask_BT = mask_bt.to(loss_bt.dtype)
    if mode == "token_mean":
        denom = mask_BT.sum() if normaliser is None else normaliser
        return (loss_bt * mask_BT).sum() / denom
    if mode == "seq_mean_token_mean":
        per_seq_B = (loss_bt * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)
        denom = per_seq_B.shape[0] if normaliser is None else normaliser
        return per_seq_B.sum() / denom
    raise ValueError(f"unknown loss_agg {mode!r}; valid: {', '.join(AGG_MODES)}")


def masked_mean(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of values where mask is set (0 when the mask is empty)."""
    m = mask_BT.to(values_BT.dtype)
    return (values_BT * m).sum() / m.sum().clamp(min=1)


__all__ = [
    "aggregate",
    "bound_token_kl",
    "clipped_pg_loss",
    "grpo_advantages",
    "kl_from_logprobs",
    "kl_weight",
    "masked_mean",
    "routed_token_loss",
    "token_kl",
    "token_kl_and_raw",
    "topk_bucket_logprobs",
]
