"""Gradient checkpointing really runs: the policy trains in train mode (transformers checkpoints
only while training), scoring passes (teacher, old log-probs) run in eval mode, and the step is
the same with and without it."""

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint

COMPARED = ("loss", "pg_loss", "kl_loss", "grad_norm", "entropy", "clip_frac")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tables = make_round_tables(make_tokenizer(), n_prompts=1, samples=4, seed=6)
    return save_tiny_checkpoint(d / "ckpt0", seed=0), tables


def _layer_calls(cfg, base, tmp_path, tag, monkeypatch):
    """Run one round; count decoder-layer forwards by (layer, training mode).

    transformers checkpoints a layer's inner `forward` and its backward replay runs without module
    hooks, so each layer is counted by the forward of its MLP, which the replay does call."""
    init, tables = base
    calls = Counter()
    mlp_forward = Qwen3MLP.forward

    def counted(self, *args, **kwargs):
        calls[(id(self), self.training)] += 1
        return mlp_forward(self, *args, **kwargs)

    monkeypatch.setattr(Qwen3MLP, "forward", counted)
    rows = train_round(cfg, **tables, init_checkpoint=init,
                       output_checkpoint=str(tmp_path / f"out-{tag}"),
                       work_dir=str(tmp_path / f"w-{tag}"), round_index=0, progress=False)
    monkeypatch.undo()
    return rows, calls


def _per_mode(calls):
    train = sorted(n for (_, training), n in calls.items() if training)
    evals = sorted(n for (_, training), n in calls.items() if not training)
    return train, evals


@pytest.mark.parametrize("method", ["grpo", "trace_live_teacher"])
def test_checkpointing_recomputes_each_layer_and_changes_nothing(base, tmp_path, method,
                                                                monkeypatch):
    kw = dict(mini_batch_size=4, micro_batch_size=4, lr=1e-3, logprob_chunk=16, tensorboard=False)
    if method == "grpo":
        kw.update(method="grpo")
    else:  # teacher = the live student under no_grad: its pass must run in eval mode
        kw.update(method="trace", route={"key_forward": True, "error_reverse": True},
                  teacher_sync_every=0)
    rows, per = {}, {}
    for ckpt in (False, True):
        cfg = TrainConfig(**kw, gradient_checkpointing=ckpt)
        rows[ckpt], calls = _layer_calls(cfg, base, tmp_path, f"{method}-{ckpt}",
                                      monkeypatch)
        per[ckpt] = _per_mode(calls)
    n_layers = 2
    # one step, one micro-batch: forward once, plus once more in the backward with checkpointing
    assert per[False][0] == [1] * n_layers and per[True][0] == [2] * n_layers
    teacher_passes = [] if method == "grpo" else [1] * n_layers
    assert per[False][1] == per[True][1] == teacher_passes
    if method != "grpo":
        assert rows[True][0]["kl_loss"] > 0
    for key in COMPARED:
        assert rows[True][0][key] == pytest.approx(rows[False][0][key], rel=1e-6, abs=1e-9), key
    wa = load_file(tmp_path / f"out-{method}-False/model.safetensors")
    wb = load_file(tmp_path / f"out-{method}-True/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-7, rtol=1e-6)


def test_old_logprob_recompute_runs_in_eval_mode(base, tmp_path, monkeypatch):
    # 4 rollouts, 2 per step: the second step's old log-probs are recomputed before training
    cfg = TrainConfig(method="grpo", mini_batch_size=2, micro_batch_size=2, lr=1e-3,
                      logprob_chunk=16, tensorboard=False, gradient_checkpointing=True)
    _, calls = _layer_calls(cfg, base, tmp_path, "recompute", monkeypatch)
    train, evals = _per_mode(calls)
    assert train == [4, 4]  # 2 steps x (forward + recompute in backward)
    assert evals == [1, 1]  # one scoring pass, never checkpointed
