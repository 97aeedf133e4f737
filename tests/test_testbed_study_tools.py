"""The issue-30 study tools: the mechanism probe's token sets and pairing, the dose study's cell
order and its premise gate (benchmarks/mechanism_probe.py, benchmarks/study_dose.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import mechanism_probe as probe
import study_dose as dose


def _rollout(correct: bool, span: list[bool], sampled: list[int], teacher_arg: list[int]) -> dict:
    return {"correct": correct, "span": np.array(span), "resp": sampled,
            "t_arg": torch.tensor(teacher_arg)}


def test_probe_token_sets_split_spans_slips_and_the_rest():
    wrong = _rollout(False, [False, True, True, False], [5, 6, 7, 8], [5, 6, 9, 8])
    m = probe.masks(wrong)
    assert m["err"].tolist() == [False, True, True, False]
    assert m["err_dis"].tolist() == [False, False, True, False]  # the one token the teacher rejects
    assert m["off_inc"].tolist() == [True, False, False, True]
    assert not m["key"].any() and not m["off_cor"].any()
    right = _rollout(True, [True, False], [1, 2], [3, 2])
    m = probe.masks(right)
    assert m["key"].tolist() == [True, False] and m["key_dis"].tolist() == [True, False]
    assert m["off_cor"].tolist() == [False, True] and not m["err"].any()


def test_probe_deltas_pool_tokens_and_pairing_is_by_batch():
    e = _rollout(False, [True, True, False], [1, 2, 3], [1, 4, 3])
    before = [{q: np.array([0.5, 0.5, 0.5]) for q in probe.QUANTITIES}]
    after = [{q: np.array([0.4, 0.7, 0.5]) for q in probe.QUANTITIES}]
    row = probe.deltas([e], before, after)
    assert row["n_err"] == 2 and row["n_err_dis"] == 1
    assert row["d_p_sampled_err"] == pytest.approx(0.05)  # mean of -0.1 and +0.2
    assert row["d_p_sampled_err_dis"] == pytest.approx(0.2) and row["d_p_sampled_key"] is None
    rows = [{"batch": b, "variant": v, "x": x} for b, v, x in
            [(0, "grpo", 1.0), (0, "t", 3.0), (1, "grpo", 2.0), (2, "t", 9.0)]]
    assert probe.paired(rows, "t", "x") == [2.0]  # batch 2 has no GRPO row to pair with


def test_dose_cells_are_seed_major_with_regimes_interleaved():
    cells = dose.cells(["long", "short"], [0, 1], [0, 1], ["grpo", "trace_rkl"], [2.0])
    assert cells[:5] == [("long", 0, 0, "grpo", None), ("short", 0, 0, "grpo", None),
                         ("long", 0, 0, "trace_rkl", None), ("short", 0, 0, "trace_rkl", None),
                         ("long", 0, 0, "trace_rkl", 2.0)]
    assert [c[2] for c in cells] == sorted(c[2] for c in cells)  # every seed 0 cell first
    assert len(cells) == 2 * 2 * (2 * 2 + 1)


@pytest.mark.parametrize(("teacher", "student", "ok"), [
    (0.95, 0.30, True), (0.89, 0.30, False), (0.95, 0.10, False), (0.95, 0.45, False)])
def test_dose_refuses_a_long_build_that_misses_the_premise(tmp_path, teacher, student, ok):
    (tmp_path / "testbed_manifest.json").write_text(
        json.dumps({"accuracy": {"privileged": teacher, "student": student}}))
    if ok:
        dose.check_premise(str(tmp_path))
    else:
        with pytest.raises(SystemExit, match="the long regime needs"):
            dose.check_premise(str(tmp_path))
