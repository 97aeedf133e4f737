"""Log-probs of one distribution: the trainer scores softmax(logits / T) at the rollouts' sampling
temperature, so recomputed and engine old log-probs agree; truncated engine log-probs are refused."""

import json

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_rl.data_schemas.errors import ConfigError
from trace_rl.stages.config import load_config
from trace_rl.trainer.batch import build_examples, pad_sequences
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.lean import KLSpec, LeanCausalLM, dense_policy_outputs
from trace_rl.trainer.round import train_round
from trace_rl.trainer.round_setup import rollout_temperature
from tiny import (
    make_model,
    make_round_tables,
    make_tokenizer,
    save_tiny_checkpoint,
)

T = 0.7
COMPARED = ("loss", "pg_loss", "kl_loss", "grad_norm", "entropy", "clip_frac")


def _with_sampling(tables, **sampling):
    rollouts = tables["rollouts"]
    col = [json.dumps({"enable_thinking": True, **sampling})] * rollouts.num_rows
    i = rollouts.schema.get_field_index("sampling")
    return {**tables, "rollouts": rollouts.set_column(i, "sampling", pa.array(col))}


def _engine_logprobs(init: str, tables) -> dict:
    """What a correct engine records: log-probs of the sampled tokens under softmax(logits / T)."""
    tok = AutoTokenizer.from_pretrained(init)
    hf = AutoModelForCausalLM.from_pretrained(init).eval()
    rows = tables["rollouts"].to_pylist()
    batch = pad_sequences([r["prompt_token_ids"] for r in rows],
                          [r["response_token_ids"] for r in rows], tok.pad_token_id)
    with torch.no_grad():
        out = dense_policy_outputs(hf, None, {"input_ids_BL": batch.input_ids_BL,
                                              "attention_mask_BL": batch.attention_mask_BL,
                                              "resp_pos_N": batch.resp_pos_N,
                                              "target_N": batch.target_N}, KLSpec(), T)
    pieces = out["logp_N"].split([len(r["response_token_ids"]) for r in rows])
    col = pa.array([p.tolist() for p in pieces], type=pa.list_(pa.float64()))
    i = tables["rollouts"].schema.get_field_index("response_logprobs")
    return {**tables, "rollouts": tables["rollouts"].set_column(i, "response_logprobs", col)}


def test_engine_and_recomputed_old_logprobs_agree_at_the_rollout_temperature(tmp_path):
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    tables = _engine_logprobs(init, _with_sampling(
        make_round_tables(make_tokenizer(), n_prompts=2, samples=4, seed=8), temperature=T))
    rows = {}
    for source in ("recompute", "engine"):
        cfg = TrainConfig(method="trace", route={"key_forward": True, "error_reverse": True},
                          mini_batch_size=4, micro_batch_size=2, lr=1e-3, logprob_chunk=16,
                          tensorboard=False, old_logprobs=source)
        rows[source] = train_round(cfg, **tables, init_checkpoint=init,
                                   output_checkpoint=str(tmp_path / f"out-{source}"),
                                   work_dir=str(tmp_path / f"w-{source}"), round_index=0,
                                   progress=False)
    assert len(rows["engine"]) == 2
    for a, b in zip(rows["recompute"], rows["engine"]):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # on-policy first step: π_θ = π_old at temperature T, so nothing is clipped
    assert rows["engine"][0]["clip_frac"] == 0


def test_lean_scores_at_the_temperature_like_the_dense_reference():
    tok = make_tokenizer()
    hf = make_model(len(tok))
    batch = pad_sequences([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], tok.pad_token_id)
    kw = dict(input_ids_BL=batch.input_ids_BL, attention_mask_BL=batch.attention_mask_BL,
              resp_pos_N=batch.resp_pos_N, target_N=batch.target_N)
    with torch.no_grad():
        lean = LeanCausalLM(hf.eval(), chunk=3)(mode="policy", temperature=T, **kw)
        dense = dense_policy_outputs(hf, None, kw, KLSpec(), T)
        at_one = dense_policy_outputs(hf, None, kw, KLSpec(), 1.0)
    torch.testing.assert_close(lean["logp_N"], dense["logp_N"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lean["entropy_N"], dense["entropy_N"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(dense["logp_N"], at_one["logp_N"])


def test_rollout_temperature_checks():
    tok = make_tokenizer()
    base = make_round_tables(tok, n_prompts=1, samples=2, seed=1)
    cfg = TrainConfig(method="grpo")
    assert rollout_temperature(cfg, build_examples(cfg, tok, **_with_sampling(
        base, temperature=T))) == T
    truncated = build_examples(cfg, tok, **_with_sampling(base, temperature=1.0, top_p=0.95))
    assert rollout_temperature(cfg, truncated) == 1.0  # recomputed log-probs: fine
    engine = TrainConfig(method="grpo", old_logprobs="engine")
    with pytest.raises(ValueError, match="old_logprobs: engine"):
        rollout_temperature(engine, truncated)
    top_k = build_examples(cfg, tok, **_with_sampling(base, temperature=1.0, top_k=20))
    with pytest.raises(ValueError, match="top-p / top-k"):
        rollout_temperature(engine, top_k)
    mixed = build_examples(cfg, tok, **base) + build_examples(cfg, tok, **_with_sampling(
        base, temperature=T))
    with pytest.raises(ValueError, match="several temperatures"):
        rollout_temperature(cfg, mixed)


@pytest.mark.parametrize("override", ["rollout.top_p=0.95", "rollout.top_k=20"])
def test_config_refuses_engine_logprobs_of_truncated_sampling(override):
    with pytest.raises(ConfigError, match="old_logprobs"):
        load_config("demo", ["train.old_logprobs=engine", override])
    load_config("demo", ["train.old_logprobs=engine", "rollout.temperature=0.7"])
    load_config("demo", ["train.old_logprobs=recompute", override])
