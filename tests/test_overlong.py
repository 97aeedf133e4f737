"""`train.overlong`: responses cut by the token limit (finish_reason "length") are masked out of
the loss (default), penalised, or trained like any wrong answer."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from tiny import make_round_tables, make_tokenizer
from trace_rl.trainer.batch import build_examples
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.losses import clipped_pg_loss, grpo_advantages

CUT = {"r0-1", "r1-0", "r2-2"}  # one cut response in three of the four groups


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    t = make_round_tables(tok, n_prompts=4, samples=4)
    rows = t["rollouts"].to_pylist()
    for r in rows:
        if r["rollout_id"] in CUT:
            r["finish_reason"] = "length"
    t["rollouts"] = pa.Table.from_pylist(rows, schema=t["rollouts"].schema)
    return tok, t


def _examples(setup, overlong: str):
    tok, t = setup
    cfg = TrainConfig(overlong=overlong, route={"key_forward": True, "error_reverse": True})
    return cfg, build_examples(cfg, tok, t["prompts"], t["rollouts"], t["verdicts"],
                               t["annotations"])


def test_default_is_mask() -> None:
    assert TrainConfig().overlong == "mask"
    with pytest.raises(ValueError):
        TrainConfig(overlong="drop")


def test_none_keeps_todays_behaviour(setup) -> None:
    _, plain = _examples(setup, "none")
    _, t = setup
    rewards = {v["rollout_id"]: v["reward"] for v in t["verdicts"].to_pylist()}
    assert [e.reward for e in plain] == [rewards[e.rollout_id] for e in plain]
    assert any(e.plan.mask_R.any() for e in plain if e.rollout_id in CUT)  # distilled today


def test_mask_takes_cut_responses_out_of_the_loss_and_the_baseline(setup) -> None:
    cfg, ex = _examples(setup, "mask")
    _, plain = _examples(setup, "none")
    adv = grpo_advantages([e.reward for e in ex], [e.group for e in ex], cfg.adv_norm_std)
    kept = [e for e in plain if e.rollout_id not in CUT]
    adv_kept = grpo_advantages([e.reward for e in kept], [e.group for e in kept], cfg.adv_norm_std)
    expected = dict(zip([e.rollout_id for e in kept], adv_kept.tolist(), strict=True))
    for e, a in zip(ex, adv.tolist(), strict=True):
        if e.rollout_id in CUT:
            assert a == 0.0 and not e.plan.mask_R.any() and e.plan.direction is None
            assert e.teacher_prompt_ids is None
        else:  # the others' advantages as if the cut responses had never been sampled
            assert a == pytest.approx(expected[e.rollout_id], abs=1e-6)
    # No gradient reaches a cut response's tokens through the policy-gradient term.
    logp = torch.zeros(len(ex), 5, requires_grad=True)
    loss_BT, _ = clipped_pg_loss(logp, torch.zeros(len(ex), 5), adv)
    loss_BT.sum().backward()
    for e, g in zip(ex, logp.grad, strict=True):
        assert (g.abs().sum() == 0) == (e.rollout_id in CUT or adv[ex.index(e)] == 0)


def test_penalize_lowers_the_reward_and_distils_nothing(setup) -> None:
    _, ex = _examples(setup, "penalize")
    _, plain = _examples(setup, "none")
    for e, p in zip(ex, plain, strict=True):
        assert e.group == p.group
        if e.rollout_id in CUT:
            assert e.reward == p.reward - 1.0 and not e.plan.mask_R.any()
        else:
            assert e.reward == p.reward and (e.plan.mask_R == p.plan.mask_R).all()


def _step_gradient(tmp_path, tables, tag: str, **kw) -> tuple[dict, list[dict]]:
    """The gradient of one optimizer step over the whole table (captured before the update)."""
    from tiny import save_tiny_checkpoint
    from trace_rl.trainer import round as round_mod

    init = tmp_path / "init"
    if not init.exists():
        save_tiny_checkpoint(init, seed=0)
    n = tables["rollouts"].num_rows
    kw["micro_batch_size"] = min(kw.get("micro_batch_size", n), n)
    cfg = TrainConfig(method="grpo", mini_batch_size=n, lr=1e-3, logprob_chunk=16,
                      tensorboard=False, report_to=[], **kw)
    grads: dict = {}
    original = round_mod._apply_update

    def capture(r, optimizer, scheduler, **kw):
        grads.update({k: p.grad.clone() for k, p in r.unwrapped.named_parameters()
                      if p.grad is not None})
        return original(r, optimizer, scheduler, **kw)

    round_mod._apply_update = capture
    try:
        rows = round_mod.train_round(cfg, **tables, init_checkpoint=str(init),
                                     output_checkpoint=str(tmp_path / f"out-{tag}"),
                                     work_dir=str(tmp_path / f"w-{tag}"), round_index=0,
                                     progress=False, write_output=False)
    finally:
        round_mod._apply_update = original
    return grads, rows


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("micro", [16, 3])  # one micro-batch, or accumulated over six
def test_masked_rollouts_add_nothing_to_the_step(setup, tmp_path, agg, micro) -> None:
    """The gradient with k cut rollouts masked equals the gradient of the batch without them:
    their tokens are out of the loss's denominator (whatever the micro-batching), and the
    entropy and length metrics count only the trained tokens."""
    _, t = setup
    cut_ids = {"r0-1", "r1-0", "r2-2", "r3-3"}  # 4 of 16
    rows = t["rollouts"].to_pylist()
    for r in rows:
        r["finish_reason"] = "length" if r["rollout_id"] in cut_ids else "stop"
    cut = pa.Table.from_pylist(rows, schema=t["rollouts"].schema)
    kept = pa.Table.from_pylist([r for r in rows if r["rollout_id"] not in cut_ids],
                                schema=t["rollouts"].schema)
    with_cut = {**t, "rollouts": cut}
    without = {**t, "rollouts": kept}
    g_cut, rows_cut = _step_gradient(tmp_path, with_cut, "cut", overlong="mask", loss_agg=agg,
                                     micro_batch_size=micro)
    g_kept, rows_kept = _step_gradient(tmp_path, without, "kept", overlong="mask", loss_agg=agg,
                                       micro_batch_size=micro)
    assert g_cut.keys() == g_kept.keys() and g_cut
    norm = lambda g: torch.sqrt(sum((v.double() ** 2).sum() for v in g.values()))
    assert norm(g_kept) > 0
    assert float(norm(g_cut) / norm(g_kept)) == pytest.approx(1.0, abs=1e-5)
    for name in g_cut:
        torch.testing.assert_close(g_cut[name], g_kept[name], rtol=1e-4, atol=1e-7)
    for key in ("entropy", "response_len_mean", "clip_frac"):
        assert rows_cut[0][key] == pytest.approx(rows_kept[0][key], rel=1e-5), key


def test_an_all_masked_mini_batch_moves_no_weight(setup, tmp_path) -> None:
    """A mini-batch whose rollouts were all cut trains no token: AdamW stepped anyway and moved
    every weight by its moments (about 2/3 of a real step, on no data). Now the weights stay,
    while the step still counts (the schedule goes on) and the next mini-batch trains."""
    import numpy as np
    from tiny import save_tiny_checkpoint
    from trace_rl.trainer import round as round_mod

    _, t = setup
    cfg = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=4, lr=1e-3,
                      logprob_chunk=16, tensorboard=False, report_to=[], overlong="mask",
                      warmup_steps=8)
    rows = t["rollouts"].to_pylist()
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(rows))  # the round's order
    second = {rows[i]["rollout_id"] for i in order[4:8]}  # step 1's mini-batch: all cut
    for r in rows:
        r["finish_reason"] = "length" if r["rollout_id"] in second else "stop"
    tables = {**t, "rollouts": pa.Table.from_pylist(rows, schema=t["rollouts"].schema)}
    moved: list[float] = []
    original = round_mod._apply_update

    def measure(r, optimizer, scheduler, **kw):
        before = [p.detach().clone() for p in r.unwrapped.parameters()]
        out = original(r, optimizer, scheduler, **kw)
        moved.append(max(float((p.detach() - b).abs().max())
                         for p, b in zip(r.unwrapped.parameters(), before)))
        return out

    round_mod._apply_update = measure
    try:
        steps = round_mod.train_round(cfg, **tables,
                                      init_checkpoint=save_tiny_checkpoint(tmp_path / "i", seed=0),
                                      output_checkpoint=str(tmp_path / "out"),
                                      work_dir=str(tmp_path / "w"), round_index=0, progress=False,
                                      write_output=False)
    finally:
        round_mod._apply_update = original
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert steps[1]["grad_norm"] == 0.0  # step 1 is the all-cut mini-batch
    assert [s["lr"] for s in steps] == pytest.approx([1e-3 * k / 8 for k in (1, 2, 3, 4)])
    assert moved[0] > 0 and moved[2] > 0 and moved[3] > 0
    assert moved[1] == 0.0, moved
