"""The teacher across rounds: at global step s it is the policy of step sync * floor(s / sync),
read from a snapshot on disk; once the KL weight is 0 no teacher exists at all."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from trace_rl.trainer.checkpoint import read_teacher_meta
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round
from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint


def _cfg(**kw):
    defaults = dict(method="trace", route={"key_forward": True, "error_reverse": True},
                    mini_batch_size=4, micro_batch_size=4, lr=1e-2, logprob_chunk=16,
                    teacher_sync_every=10, tensorboard=False,
                    schedule={"hold_steps": 30, "zero_step": 40})
    return TrainConfig(**{**defaults, **kw})


def _digest(weights: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(weights):
        if k != "lm_head.weight":  # tied: the same tensor as the embeddings
            h.update(weights[k].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_teacher_changes_exactly_at_sync_steps_across_one_step_rounds(tmp_path):
    tok = make_tokenizer()
    ckpts = [save_tiny_checkpoint(tmp_path / "ckpt-00", seed=0)]
    tables = make_round_tables(tok, n_prompts=1, samples=4, seed=4)  # 4 rollouts = one step
    cfg = _cfg()
    teacher_of_step = {}
    for k in range(25):
        out = tmp_path / f"ckpt-{k + 1:02d}"
        rows = train_round(cfg, **tables, init_checkpoint=ckpts[-1], output_checkpoint=str(out),
                           work_dir=str(tmp_path / f"work-{k}"), round_index=k, progress=False)
        assert [r["step"] for r in rows] == [k]
        assert rows[0]["teacher/step"] == 10 * (k // 10)
        assert rows[0]["kl_loss"] > 0
        # the teacher actually used at step k: the snapshot of this round, or the one inherited
        meta = read_teacher_meta(ckpts[-1])
        snaps = sorted((tmp_path / f"work-{k}").glob("progress-teacher-step*"))
        if k % 10 == 0:
            assert len(snaps) == 1 and snaps[0].name.endswith(f"{k:08d}")
            teacher_of_step[k] = _digest(load_file(snaps[0] / "model.safetensors"))
        else:
            assert not snaps and meta is not None and meta[0] == 10 * (k // 10)
            teacher_of_step[k] = _digest(load_file(meta[2] / "model.safetensors"))
        ckpts.append(str(out))
    policy = {s: _digest(load_file(f"{ckpts[s]}/model.safetensors")) for s in range(25)}
    assert len(set(policy.values())) == 25  # every step moved the weights
    for s in range(25):
        assert teacher_of_step[s] == policy[10 * (s // 10)], s
    changes = [s for s in range(25) if s == 0 or teacher_of_step[s] != teacher_of_step[s - 1]]
    assert changes == [0, 10, 20]
    # a round that ends on a sync boundary hands no teacher over: the next one snapshots anyway
    assert read_teacher_meta(ckpts[10]) is None and read_teacher_meta(ckpts[11]) is not None


def test_no_teacher_once_the_kl_weight_is_zero(tmp_path):
    tok = make_tokenizer()
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    tables = make_round_tables(tok, n_prompts=2, samples=4, seed=4)  # 8 rollouts = 2 steps
    cfg = _cfg(teacher_sync_every=3, schedule={"hold_steps": 0, "zero_step": 1})
    rows = train_round(cfg, **tables, init_checkpoint=init, output_checkpoint=str(tmp_path / "c1"),
                       work_dir=str(tmp_path / "w0"), round_index=0, progress=False)
    assert [r["kl_weight"] for r in rows] == [0.5, 0.0]
    assert rows[0]["teacher/step"] == 0 and rows[1]["teacher/step"] is None
    assert rows[1]["kl_loss"] == 0
    # λ = 0 from here on: the checkpoint carries no teacher, and the next round loads none
    assert read_teacher_meta(tmp_path / "c1") is None
    rows = train_round(cfg, **tables, init_checkpoint=str(tmp_path / "c1"),
                       output_checkpoint=str(tmp_path / "c2"), work_dir=str(tmp_path / "w1"),
                       round_index=1, progress=False)
    assert all(r["teacher/step"] is None for r in rows)
    assert not list((tmp_path / "w1").glob("progress-teacher-step*"))
    state = torch.load(tmp_path / "c2/trainer_state/state.pt", weights_only=False)
    assert state["global_step"] == 4
