"""Rollout ids are unique by contract: a round never draws a prompt twice (also across an epoch
boundary), and the store refuses a dataset with a repeated rollout_id."""

from __future__ import annotations

import random

import pytest

from trace_rl.stages.rollout import rollout_id, select_prompt_ids


def test_the_issue_case_draws_four_different_prompts() -> None:
    ids = [f"p{i:03d}" for i in range(10)]
    for k in range(40):
        got = select_prompt_ids(ids, k, 4, seed=0)
        assert len(set(got)) == 4, (k, got)


def test_rounds_are_unique_and_epochs_are_permutations_property() -> None:
    """Property: every round draws distinct prompts; the concatenated draws, cut into epochs of
    n, hold every prompt exactly once per epoch; a round's draw depends only on its index."""
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 30)
        per_round = rng.randint(1, n)
        seed = rng.randint(0, 5)
        ids = [f"q{i}" for i in rng.sample(range(1000), n)]
        rounds = [select_prompt_ids(ids, k, per_round, seed) for k in range(3 * n // per_round + 2)]
        for r in rounds:
            assert len(r) == per_round and len(set(r)) == per_round
        flat = [i for r in rounds for i in r]
        for e in range(len(flat) // n):
            assert sorted(flat[e * n:(e + 1) * n]) == sorted(ids), (n, per_round, e)
        k = rng.randrange(len(rounds))
        assert select_prompt_ids(list(reversed(ids)), k, per_round, seed) == rounds[k]


def test_rounds_inside_an_epoch_are_unchanged() -> None:
    """Rounds that do not straddle an epoch boundary draw what they drew before the fix: the
    seeded permutation's slice (so runs resumed across the fix keep their early rounds)."""
    ids = [f"p{i:03d}" for i in range(10)]
    perm = sorted(ids)
    random.Random("0:0").shuffle(perm)
    assert select_prompt_ids(ids, 0, 4, 0) == perm[:4]
    assert select_prompt_ids(ids, 1, 4, 0) == perm[4:8]


def test_more_prompts_per_round_than_prompts_is_refused() -> None:
    with pytest.raises(ValueError, match="prompts_per_round=5 exceeds the 3 prompts"):
        select_prompt_ids(["a", "b", "c"], 0, 5, 0)


def test_the_store_refuses_a_repeated_rollout_id(tmp_path) -> None:
    from trace_rl.data_schemas import ROLLOUTS
    from trace_rl.data_schemas.errors import SchemaError
    from trace_rl.pipeline.store import RunStore

    row = {"rollout_id": rollout_id(0, "p1", 0), "prompt_id": "p1", "round": 0, "sample_index": 0,
           "checkpoint": "c", "response_text": "x", "response_token_ids": [1],
           "response_logprobs": [0.0], "prompt_token_ids": [1], "finish_reason": "stop", "engine": "hf",
           "sampling": "{}"}
    store = RunStore(str(tmp_path))
    with pytest.raises(SchemaError, match="repeated rollout_id .0000:p1:0."):
        with store.writer("round-0000/rollouts", ROLLOUTS, stage="rollout",
                          config_fingerprint="f", inputs={}) as w:
            w.write_rows([row])
            w.write_rows([row])  # a second part repeating it
    assert store.manifest("round-0000/rollouts") is None  # nothing committed
