"""train_round on a tiny random Qwen3: micro-batch invariance, checkpoints, cross-round state."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint

DETERMINISTIC = ("step", "loss", "pg_loss", "kl_loss", "kl_weight", "entropy", "grad_norm",
                 "response_len_mean", "span_token_frac", "clip_frac")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    return save_tiny_checkpoint(d / "ckpt0", seed=0), make_round_tables(make_tokenizer(), seed=1)


def _cfg(**kw):
    defaults = dict(method="trace", route={"key_forward": True, "error_reverse": True},
                    mini_batch_size=8, micro_batch_size=8, lr=1e-3, logprob_chunk=16,
                    tensorboard=False)
    return TrainConfig(**{**defaults, **kw})


def _train(cfg, tables, init, out, work, round_index=0):
    return train_round(cfg, **tables, init_checkpoint=str(init), output_checkpoint=str(out),
                       work_dir=str(work), round_index=round_index, progress=False)


def _weights(path):
    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_invariance(base, tmp_path, agg):
    init, tables = base
    rows = {}
    for micro in (8, 1):
        cfg = _cfg(micro_batch_size=micro, loss_agg=agg)
        rows[micro] = _train(cfg, tables, init, tmp_path / f"out{micro}", tmp_path / f"w{micro}")
    assert len(rows[8]) == 2  # 16 rollouts, 8 per optimizer step
    for a, b in zip(rows[8], rows[1]):
        for key in DETERMINISTIC:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert rows[8][0]["kl_loss"] > 0 and rows[8][0]["span_token_frac"] > 0
    wa, wb = _weights(tmp_path / "out8"), _weights(tmp_path / "out1")
    moved = max((wa[k] - load_file(f"{init}/model.safetensors")[k]).abs().max().item()
                for k in wa if k != "lm_head.weight")
    assert moved > 1e-4  # training changed the weights, so the comparison below can fail
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4)  # Adam amplifies 1e-7 noise on ~0 grads


def test_checkpoint_loadable_and_state_continues_across_rounds(base, tmp_path):
    init, tables = base
    cfg = _cfg(mini_batch_size=4, micro_batch_size=2, save_every=0)
    rows0 = _train(cfg, tables, init, tmp_path / "ck1", tmp_path / "w0", 0)
    assert [r["step"] for r in rows0] == [0, 1, 2, 3]
    # lm_head.weight is on disk even though the embeddings are tied (vLLM-friendly)
    on_disk = _weights(tmp_path / "ck1")
    assert "lm_head.weight" in on_disk
    torch.testing.assert_close(on_disk["lm_head.weight"], on_disk["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck1")
    AutoTokenizer.from_pretrained(tmp_path / "ck1")
    torch.testing.assert_close(model.model.embed_tokens.weight, on_disk["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "ck1/trainer_state/state.json").read_text())["global_step"] == 4
    # The checkpoint carries the config its readers generate with, not the trainer's cache-off one
    # (a run-scoped engine compares configs before loading new weights in place).
    init_config = json.loads((Path(init) / "config.json").read_text())
    saved_config = json.loads((tmp_path / "ck1/config.json").read_text())
    assert saved_config.get("use_cache", True) is True
    assert {k: v for k, v in saved_config.items() if k not in ("_name_or_path", "transformers_version")} \
        == {k: v for k, v in init_config.items() if k not in ("_name_or_path", "transformers_version")}
    # round 1 continues the global step (and so the λ schedule) and the optimizer state
    cfg1 = _cfg(mini_batch_size=4, micro_batch_size=2, schedule={"hold_steps": 5, "zero_step": 7})
    rows1 = _train(cfg1, tables, tmp_path / "ck1", tmp_path / "ck2", tmp_path / "w1", 1)
    assert [r["step"] for r in rows1] == [4, 5, 6, 7]
    assert [r["kl_weight"] for r in rows1] == pytest.approx([0.5, 0.5, 0.25, 0.0])
    assert rows1[-1]["kl_loss"] == 0.0 and rows1[0]["kl_loss"] > 0
    state = torch.load(tmp_path / "ck2/trainer_state/state.pt", weights_only=False)
    assert state["global_step"] == 8 and state["optimizer"]["state"]
    first = next(iter(state["optimizer"]["state"].values()))
    assert int(first["step"]) == 8  # AdamW's step counter carried over from round 0


def test_grpo_and_self_opd_replace_run(base, tmp_path):
    init, tables = base
    rows = _train(_cfg(method="grpo"), tables, init, tmp_path / "g", tmp_path / "wg")
    assert all(r["kl_loss"] == 0 and r["span_token_frac"] == 0 for r in rows)
    rows = _train(_cfg(method="self_opd", self_opd={"mode": "replace", "direction": "reverse"},
                       kl_bound="none"),
                  tables, init, tmp_path / "s", tmp_path / "ws")
    assert all(r["pg_loss"] == 0 and r["span_token_frac"] == 1.0 for r in rows)
    assert rows[0]["kl/reverse"] == pytest.approx(rows[0]["kl_loss"], rel=1e-5)


def test_synthetic_round_tables_meet_the_contracts():
    from trace_rl.data_schemas import ANNOTATIONS, PROMPTS, ROLLOUTS, VERDICTS, rows_to_table

    tables = make_round_tables(make_tokenizer(), seed=1)
    for name, schema in [("prompts", PROMPTS), ("rollouts", ROLLOUTS), ("verdicts", VERDICTS),
                         ("annotations", ANNOTATIONS)]:
        rows_to_table(tables[name].to_pylist(), schema, where=name)
    # pyarrow does not check nested nullability: a span's label is a string, "" for none
    spans = [s for a in tables["annotations"].to_pylist() for s in a["spans"]]
    assert spans and all(isinstance(s["label"], str) for s in spans)
    assert {s["label"] for s in spans} == {"missing carry", ""}
