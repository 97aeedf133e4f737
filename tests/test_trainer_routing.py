"""Routing and λ live in the method registry: the annotate stage and the trainer's span plan
must agree for every method and route-flag combination."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from trace_rl.stages.annotate import route_for
from trace_rl.stages.config import TraceConfig
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.losses import kl_weight
from trace_rl.trainer.methods import METHODS, ROUTES, RolloutView, get_method

N = 40
FLAGS = [(True, False), (False, True), (True, True)]  # fkl, rkl, both


def _configs():
    yield "grpo", TrainConfig(method="grpo")
    for direction, mode in itertools.product(("forward", "reverse", "jsd"), ("add", "replace")):
        yield f"self_opd-{direction}-{mode}", TrainConfig(
            method="self_opd", self_opd={"direction": direction, "mode": mode})
    for source, (fkl, rkl) in itertools.product(("annotated", "random", "inverted"), FLAGS):
        yield f"trace-{source}-fkl{int(fkl)}-rkl{int(rkl)}", TrainConfig(
            method="trace", span_source=source, route={"key_forward": fkl, "error_reverse": rkl})


CONFIGS = list(_configs())


def _expected_route(t: TrainConfig, correct: bool) -> str:
    """METHOD.md's routing table, written out independently of the registry."""
    if t.method != "trace" or t.span_source == "random":
        return "none"
    if correct and t.route.key_forward:
        return "key"
    if not correct and t.route.error_reverse:
        return "error"
    return "none"


def _annotated_view(rid: str, correct: bool, route: str) -> RolloutView:
    """The row the annotate stage writes for this route: spans when asked, `skipped` otherwise."""
    if route == "none":
        return RolloutView(rid, N, correct, False, "none", [])
    return RolloutView(rid, N, correct, True, route, [(3, 9, "missing case"), (20, 22, None)])


@pytest.mark.parametrize("name,train", CONFIGS, ids=[n for n, _ in CONFIGS])
@pytest.mark.parametrize("correct", [True, False])
def test_annotate_routing_agrees_with_the_trainer_plan(name, train, correct):
    route = route_for(TraceConfig(train=train), correct)
    assert route in ROUTES and route == _expected_route(train, correct)
    plan = get_method(train.method).plan(train, _annotated_view(f"r-{name}", correct, route))
    if train.method == "grpo":
        assert plan.direction is None and not plan.mask_R.any()
    elif train.method == "self_opd":
        assert plan.direction == train.self_opd.direction and plan.mask_R.all()
    elif train.span_source == "random":
        # no annotator involved: the flags and correctness alone pick the rollouts
        wanted = "forward" if correct and train.route.key_forward else (
            "reverse" if not correct and train.route.error_reverse else None)
        assert plan.direction == wanted
        assert plan.mask_R.sum() == (int(0.25 * N) if wanted else 0)
    else:
        # annotated / inverted: distilled exactly when the stage asked for spans, in its direction
        assert plan.direction == {"key": "forward", "error": "reverse", "none": None}[route]
        assert plan.mask_R.any() == (route != "none")
        if train.span_source == "inverted" and route != "none":
            assert not plan.mask_R[3:9].any() and not plan.mask_R[20:22].any()


def test_trace_ignores_annotations_of_another_route():
    # spans the stage was not asked for (e.g. from an earlier config) are never distilled on
    fkl = TrainConfig(method="trace", route={"key_forward": True, "error_reverse": True})
    trace = get_method("trace")
    mislabeled = RolloutView("r", N, True, True, "error", [(0, 5, None)])
    assert trace.plan(fkl, mislabeled).direction is None
    failed = RolloutView("r", N, True, False, "key", [(0, 5, None)])
    assert trace.plan(fkl, failed).direction is None


@pytest.mark.parametrize("step", [0, 9, 10, 25, 39, 40, 100])
def test_lambda_schedule_comes_from_the_registry(step):
    sched = {"w0": 0.4, "hold_steps": 5, "zero_step": 30}
    expected = kl_weight(step, 0.4, 5, 30)
    assert get_method("grpo").kl_weight(TrainConfig(method="grpo", schedule=sched), step) == 0.0
    trace = TrainConfig(method="trace", schedule=sched)
    assert get_method("trace").kl_weight(trace, step) == pytest.approx(expected)
    add = TrainConfig(method="self_opd", schedule=sched)
    assert get_method("self_opd").kl_weight(add, step) == pytest.approx(expected)
    replace = TrainConfig(method="self_opd", self_opd={"mode": "replace"}, schedule=sched)
    assert get_method("self_opd").kl_weight(replace, step) == 1.0


def test_unknown_method_raises_with_the_valid_names():
    assert set(METHODS) == {"grpo", "self_opd", "trace"}
    with pytest.raises(ValueError, match=r"unknown method 'ppo'; valid: grpo, self_opd, trace"):
        get_method("ppo")
    # the stage asks the same registry, so a config that bypassed validation fails the same way
    cfg = TraceConfig()
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": "ppo"})})
    with pytest.raises(ValueError, match="valid: grpo, self_opd, trace"):
        route_for(cfg, True)
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="ppo")


def test_random_ablation_mask_is_seeded_per_rollout():
    rnd = TrainConfig(method="trace", span_source="random")
    view = RolloutView("r1", N, True, False, "none", [])
    a = get_method("trace").plan(rnd, view).mask_R
    assert np.array_equal(a, get_method("trace").plan(rnd, view).mask_R)
