"""Hand-computed values of the dense reference losses (two-token vocabulary unless stated)."""

import math

import numpy as np
import pytest
import torch

from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.losses import aggregate, grpo_advantages, kl_weight, routed_token_loss, token_kl
from trace_rl.trainer.methods import LossInputs, RolloutView, get_method

LN = math.log
# student logits [0, 0] -> p = (1/2, 1/2); teacher logits [ln 3, 0] -> q = (3/4, 1/4)
S = torch.tensor([[0.0, 0.0]])
T = torch.tensor([[LN(3.0), 0.0]])


def test_forward_kl_is_kl_teacher_student():
    # KL(q||p) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812
    expected = 0.75 * LN(1.5) + 0.25 * LN(0.5)
    assert token_kl(S, T, "forward").item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.130812, abs=1e-6)


def test_reverse_kl_is_kl_student_teacher():
    # KL(p||q) = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4) = 0.143841 (differs from forward)
    expected = 0.5 * LN(0.5 / 0.75) + 0.5 * LN(2.0)
    got = token_kl(S, T, "reverse").item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert got != pytest.approx(token_kl(S, T, "forward").item(), abs=1e-3)


def test_per_term_clip_clamps_each_vocab_term_from_above():
    clip = dict(bound="per_term_clip", c=0.05)
    # forward terms: 0.75 ln 1.5 = 0.3041 -> 0.05 ; 0.25 ln 0.5 = -0.1733 kept  => -0.1233
    assert token_kl(S, T, "forward", **clip).item() == pytest.approx(0.05 + 0.25 * LN(0.5), abs=1e-6)
    # reverse terms: 0.5 ln(2/3) = -0.2027 kept ; 0.5 ln 2 = 0.3466 -> 0.05  => -0.1527
    assert token_kl(S, T, "reverse", **clip).item() == pytest.approx(0.5 * LN(2 / 3) + 0.05, abs=1e-6)


def test_token_scale_caps_value_and_scales_gradient():
    # forward KL = 0.130812 > c = 0.1: value c, gradient (p - q) * c / KL; below the cap, untouched
    s = S.clone().requires_grad_(True)
    kl = token_kl(s, T, "forward", bound="token_scale", c=0.1)
    assert kl.item() == pytest.approx(0.1, abs=1e-6)
    kl.sum().backward()
    factor = 0.1 / (0.75 * LN(1.5) + 0.25 * LN(0.5))
    torch.testing.assert_close(s.grad, torch.tensor([[-0.25, 0.25]]) * factor)
    assert token_kl(S, T, "forward", bound="token_scale", c=1.0).item() == pytest.approx(
        token_kl(S, T, "forward").item(), abs=1e-7)
    with pytest.raises(ValueError, match="token_scale, none, per_term_clip"):
        token_kl(S, T, "forward", bound="clamp")


# SGD on the student's logits alone (V = 2,000, one token holds the disagreement, the rest is
# uniform): (student prob, teacher prob) of that token. Sharp and mild, upwards and downwards.
SGD_CASES = {"mild_up": (0.30, 0.45), "sharp_up": (0.01, 0.90), "sharp_down": (0.60, 0.001),
             "mild_down": (0.45, 0.30)}


def _one_hot_logits(probs: list[float], V: int = 2000) -> torch.Tensor:
    rows = []
    for p in probs:
        row = torch.full((V,), LN((1 - p) / (V - 1)))
        row[0] = LN(p)
        rows.append(row)
    return torch.stack(rows)


def _sgd(direction: str, support: str, bound: str, c: float, steps: int = 300, lr: float = 1.0):
    """Rows are independent (the loss is a sum over rows), so the four cases run as one batch."""
    s0, q = zip(*SGD_CASES.values())
    student = _one_hot_logits(list(s0)).requires_grad_(True)
    teacher = _one_hot_logits(list(q))
    true_before = token_kl(student.detach(), teacher, direction)
    opt = torch.optim.SGD([student], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        token_kl(student, teacher, direction, bound=bound, c=c, support=support, topk=20).sum().backward()
        opt.step()
    p_after = student.detach().softmax(-1)[:, 0]
    return torch.tensor(s0), torch.tensor(q), p_after, true_before, token_kl(student.detach(), teacher, direction)


@pytest.mark.parametrize("support", ["full", "topk"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("bound", ["token_scale", "none"])
def test_sgd_on_the_kl_moves_the_student_toward_the_teacher(bound, direction, support):
    """Every shipped bound: the token closes at least half its gap, the true (unbounded) KL falls."""
    c = TrainConfig().kl_token_cap if bound == "token_scale" else 1.0
    s0, q, p, kl_before, kl_after = _sgd(direction, support, bound, c)
    for i, name in enumerate(SGD_CASES):
        assert abs(p[i] - q[i]) <= 0.5 * abs(s0[i] - q[i]), (name, p[i].item())
        assert kl_after[i] < kl_before[i], (name, kl_before[i].item(), kl_after[i].item())


def test_default_config_bound_is_direction_preserving():
    cfg = TrainConfig()
    assert cfg.kl_bound == "token_scale" and cfg.kl_token_cap == 1.0


def test_per_term_clip_reverses_the_gradient():
    """The opt-in literal reading: forward, teacher 0.45 vs student 0.30, the student's token FALLS
    and the true KL rises (why it is not the default)."""
    s0, _, p, kl_before, kl_after = _sgd("forward", "full", "per_term_clip", 0.05)
    assert p[0] < 0.5 * s0[0] and kl_after[0] > 5 * kl_before[0]


def test_jsd_symmetric_beta_half():
    # m = (5/8, 3/8); JSD = 1/2 KL(q||m) + 1/2 KL(p||m)
    kl_qm = 0.75 * LN(0.75 / 0.625) + 0.25 * LN(0.25 / 0.375)
    kl_pm = 0.5 * LN(0.5 / 0.625) + 0.5 * LN(0.5 / 0.375)
    got = token_kl(S, T, "jsd", beta=0.5).item()
    assert got == pytest.approx(0.5 * kl_qm + 0.5 * kl_pm, abs=1e-6)
    assert got == pytest.approx(0.033822, abs=1e-5)


def test_topk_support_with_tail_bucket():
    # 3 tokens, student p = (.5, .3, .2), teacher q = (.2, .3, .5); k = 1 keeps the student's top
    # id 0 and the teacher's top id 2, and the tail bucket is token 1 alone: the whole vocabulary
    s = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    t = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    for direction in ("forward", "reverse", "jsd"):
        full = token_kl(s, t, direction).item()
        assert token_kl(s, t, direction, support="topk", topk=1).item() == pytest.approx(full, abs=1e-5)
    # the same top id for both: support {0} + tail, p' = (.5, .5), q' = (.6, .4)
    t_same = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    got = token_kl(s, t_same, "forward", support="topk", topk=1).item()
    assert got == pytest.approx(0.6 * LN(0.6 / 0.5) + 0.4 * LN(0.4 / 0.5), abs=1e-5)


def test_topk_forward_kl_sees_teacher_mass_outside_student_topk():
    # V = 1000: the student ranks ids 0..19; the teacher puts 90% of its mass on ids 500..509,
    # which the student gives little. Student-only top-k would fold that mass into the tail.
    V, k = 1000, 20
    gen = torch.Generator().manual_seed(0)
    s_logits = torch.randn(4, V, generator=gen) * 0.1
    s_logits[:, :k] += 6.0
    t_logits = torch.randn(4, V, generator=gen) * 0.1
    t_logits[:, 500:510] += 9.0
    full = token_kl(s_logits, t_logits, "forward")
    union = token_kl(s_logits, t_logits, "forward", support="topk", topk=k)
    assert torch.allclose(union, full, rtol=0.05), (union, full)
    # what the student's top-k plus tail alone measures: the teacher's 10 ids share one bucket
    # with 970 others, a far smaller divergence than the full one
    s_lp, t_lp = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    top = s_lp.topk(k, -1).indices
    tail = lambda lp: torch.log1p(-lp.gather(-1, top).exp().sum(-1, keepdim=True))
    s_b = torch.cat([s_lp.gather(-1, top), tail(s_lp)], -1)
    t_b = torch.cat([t_lp.gather(-1, top), tail(t_lp)], -1)
    student_only = (t_b.exp() * (t_b - s_b)).sum(-1)
    assert (student_only < 0.5 * full).all(), (student_only, full)
    # gradients flow to the student's logits at the teacher's ids
    s_req = s_logits.clone().requires_grad_(True)
    token_kl(s_req, t_logits, "forward", support="topk", topk=k).sum().backward()
    assert (s_req.grad[:, 500:510] < 0).all()  # descent raises the teacher's tokens


def test_unknown_direction_lists_valid():
    with pytest.raises(ValueError, match="forward, reverse, jsd"):
        token_kl(S, T, "sideways")


@pytest.mark.parametrize("step,expected", [(0, 0.5), (9, 0.5), (10, 0.5), (25, 0.25),
                                           (39, 0.5 / 30), (40, 0.0), (100, 0.0)])
def test_kl_weight_schedule(step, expected):
    # 10 <= k < 40: 0.5 * (40 - k) / 30
    assert kl_weight(step) == pytest.approx(expected)


def test_grpo_advantages_unbiased_std_and_singletons():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    groups = ["a", "a", "b", "b", "c"]
    # group a: mean 1/2, unbiased std sqrt((1/4 + 1/4) / 1) = 0.7071 -> +-0.7071
    # group b: all equal -> 0 ; group c: a group of one -> 0
    adv = grpo_advantages(rewards, groups)
    r = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert adv.tolist() == pytest.approx([r, -r, 0.0, 0.0, 0.0], abs=1e-6)
    # Dr.GRPO: no std division
    assert grpo_advantages(rewards, groups, norm_std=False).tolist() == pytest.approx(
        [0.5, -0.5, 0.0, 0.0, 0.0])


def _pg_case():
    # ratios 1.2, 1.5, 0.5 (old prob 0.5 everywhere)
    logp = torch.log(torch.tensor([[0.6, 0.75, 0.25]]))
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    return logp, old


def test_routed_token_loss_clip_higher_and_span_mix():
    logp, old = _pg_case()
    zeros = torch.zeros_like(logp)
    no_span = torch.zeros_like(logp, dtype=torch.bool)
    # A = +1: -min(1.2, 1.2) = -1.2 ; -min(1.5, clip 1.28) = -1.28 ; -min(0.5, 0.8) = -0.5
    got = routed_token_loss(logp, old, torch.tensor([1.0]), zeros, no_span, 0.0, 0.5)
    assert got[0].tolist() == pytest.approx([-1.2, -1.28, -0.5], abs=1e-5)
    # A = -1: -min(-1.2, -1.2) = 1.2 ; -min(-1.5, -1.28) = 1.5 ; -min(-0.5, -0.8) = 0.8
    got = routed_token_loss(logp, old, torch.tensor([-1.0]), zeros, no_span, 0.0, 0.5)
    assert got[0].tolist() == pytest.approx([1.2, 1.5, 0.8], abs=1e-5)
    # span on token 1 with kl 0.2, lam 0.25, w0 0.5: (1 - 0.5)(-1.28) + 0.25 * 0.2 = -0.59
    kl = torch.tensor([[0.0, 0.2, 0.0]])
    span = torch.tensor([[False, True, False]])
    got = routed_token_loss(logp, old, torch.tensor([1.0]), kl, span, 0.25, 0.5)
    assert got[0].tolist() == pytest.approx([-1.2, -0.59, -0.5], abs=1e-5)


def test_aggregate_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    # with the global normaliser two halves add up to the whole
    halves = [aggregate(loss[i : i + 1], mask[i : i + 1], "token_mean", normaliser=4.0)
              for i in range(2)]
    assert sum(h.item() for h in halves) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean"):
        aggregate(loss, mask, "sum")


def test_registry_unknown_method_lists_valid():
    with pytest.raises(ValueError, match="grpo, self_opd, trace"):
        get_method("ppo")


def _inputs(lam_span):
    logp, old = _pg_case()
    return LossInputs(logp, old, torch.tensor([1.0]), torch.ones_like(logp, dtype=torch.bool),
                      torch.tensor([[False, True, False]]), torch.tensor([[0.0, 0.2, 0.0]]), 3.0)


def test_methods_losses():
    cfg = TrainConfig(method="trace")
    # grpo: mean(-1.2, -1.28, -0.5) = -0.99333
    loss, m = get_method("grpo").loss(_inputs(0), cfg, 0.0)
    assert loss.item() == pytest.approx(-2.98 / 3, abs=1e-5) and m["kl_loss"].item() == 0.0
    # trace at lam 0.25: (-1.2 - 0.59 - 0.5) / 3 ; kl part 0.05 / 3
    loss, m = get_method("trace").loss(_inputs(0), cfg, 0.25)
    assert loss.item() == pytest.approx(-2.29 / 3, abs=1e-5)
    assert m["kl_loss"].item() == pytest.approx(0.05 / 3, abs=1e-6)
    # self_opd replace: kl alone, weight 1 on the distilled tokens: 0.2 / 3
    cfg_r = TrainConfig(method="self_opd", self_opd={"mode": "replace"})
    loss, m = get_method("self_opd").loss(_inputs(0), cfg_r, 1.0)
    assert loss.item() == pytest.approx(0.2 / 3, abs=1e-6) and m["pg_loss"].item() == 0.0


def _view(rid="r1", correct=True, route="key", spans=((0, 2),), n=40, ok=True):
    return RolloutView(rid, n, correct, ok, route, [(a, b, None) for a, b in spans])


def test_trace_routing_and_ablation_spans():
    trace = get_method("trace")
    fkl = TrainConfig(method="trace", route={"key_forward": True, "error_reverse": False})
    plan = trace.plan(fkl, _view())
    assert plan.direction == "forward" and plan.mask_R.nonzero()[0].tolist() == [0, 1]
    # error spans are ignored unless error_reverse is on; non-ok annotations give no spans
    assert trace.plan(fkl, _view(correct=False, route="error")).direction is None
    rkl = TrainConfig(method="trace", route={"key_forward": False, "error_reverse": True})
    assert trace.plan(rkl, _view(correct=False, route="error")).direction == "reverse"
    assert trace.plan(rkl, _view(correct=False, route="error", ok=False)).direction is None
    rnd = TrainConfig(method="trace", span_source="random")
    a, b = trace.plan(rnd, _view()), trace.plan(rnd, _view())
    assert a.mask_R.sum() == 10 and np.array_equal(a.mask_R, b.mask_R)  # 25% of 40, seeded
    assert not np.array_equal(a.mask_R, trace.plan(rnd, _view(rid="r2")).mask_R)
    # The random ablation needs no annotation: the annotate stage skips these rollouts.
    skipped = trace.plan(rnd, _view(route="none", spans=(), ok=False))
    assert skipped.direction == "forward" and skipped.mask_R.sum() == 10
    assert trace.plan(rnd, _view(correct=False, route="none", spans=(), ok=False)).direction is None
    inv = trace.plan(TrainConfig(method="trace", span_source="inverted"),
                     _view(spans=((0, 20),)))
    assert inv.mask_R.sum() == 10 and not inv.mask_R[:20].any()


def test_config_validation_messages():
    with pytest.raises(ValueError, match="route.key_forward or route.error_reverse"):
        TrainConfig(method="trace", route={"key_forward": False, "error_reverse": False})
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(methd="trace")
    with pytest.raises(ValueError, match=r"\{problem\} and \{context\}"):
        TrainConfig(teacher_template="{problem} {hint}")
