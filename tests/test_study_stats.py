"""The across-builds study's interval (benchmarks/study_report.py): a two-level bootstrap over
builds, then seeds within each drawn build."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from study_report import paired_final, two_level_bootstrap


def _random_groups(rng) -> list[list[float]]:
    return [list(rng.normal(rng.normal(0, 0.02), 0.02, size=rng.integers(1, 8)))
            for _ in range(rng.integers(1, 5))]


def test_estimate_weighs_builds_equally_and_the_interval_holds_it():
    rng = np.random.default_rng(0)
    for _ in range(30):
        groups = _random_groups(rng)
        est, lo, hi = two_level_bootstrap(groups, resamples=2000, seed=1)
        assert est == pytest.approx(np.mean([np.mean(g) for g in groups]))
        lo_all, hi_all = min(min(g) for g in groups), max(max(g) for g in groups)
        assert lo_all - 1e-12 <= lo <= hi <= hi_all + 1e-12
    # unequal seed counts: the pooled mean of all pairs is not the estimate
    est, _, _ = two_level_bootstrap([[0.0], [1.0, 1.0, 1.0]], resamples=100)
    assert est == pytest.approx(0.5)


def test_shifting_every_difference_shifts_estimate_and_interval():
    rng = np.random.default_rng(2)
    for _ in range(20):
        groups = _random_groups(rng)
        c = float(rng.normal(0, 0.05))
        a = two_level_bootstrap(groups, resamples=1000, seed=5)
        b = two_level_bootstrap([[x + c for x in g] for g in groups], resamples=1000, seed=5)
        assert np.allclose(np.subtract(b, a), c, atol=1e-12)


def test_constant_differences_give_a_point_interval():
    assert two_level_bootstrap([[0.02] * 4, [0.02] * 6, [0.02]], resamples=500) == pytest.approx(
        (0.02, 0.02, 0.02))


def test_the_interval_carries_build_to_build_variance():
    # no spread within builds, a lot between them: a seeds-only bootstrap would give a point
    groups = [[-0.03] * 6, [0.0] * 6, [0.05] * 6]
    est, lo, hi = two_level_bootstrap(groups, resamples=4000, seed=3)
    assert est == pytest.approx(np.mean([-0.03, 0.0, 0.05]))
    assert lo < est - 0.01 and hi > est + 0.01
    assert lo >= -0.03 - 1e-12 and hi <= 0.05 + 1e-12
    # more builds with the same spread narrow it
    _, lo9, hi9 = two_level_bootstrap(groups * 3, resamples=4000, seed=3)
    assert hi9 - lo9 < hi - lo


def test_paired_final_pairs_by_seed_at_the_last_round_only():
    rows = [{"method": m, "seed": s, "round": r, "heldout_acc": acc}
            for m, off in (("grpo", 0.0), ("trace_rkl", 0.1)) for s in (0, 1, 2)
            for r, acc in ((0, 0.3), (5, 0.4 + off + 0.01 * s))]
    rows.append({"method": "trace_rkl", "seed": 3, "round": 5, "heldout_acc": 0.9})  # no grpo
    rows = [r for r in rows if not (r["method"] == "grpo" and r["seed"] == 2 and r["round"] == 5)]
    diffs = paired_final(pd.DataFrame(rows), "trace_rkl")
    assert diffs == pytest.approx([0.1, 0.1])
