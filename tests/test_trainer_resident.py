"""The run-scoped trainer: rounds that keep policy and optimizer in memory, weights-only
checkpoints between full trainer states, and the replay that rebuilds a missing optimizer state.

Three runs of the same 3 rounds on the tiny testbed, through the stage functions:
  - resident: inside `trainer_session` (as the flow runs them), `state_every=5`;
  - cold, `state_every=1`: every round loads checkpoint k with its full state from disk;
  - cold, `state_every=5`: rounds 1 and 2 start from weights-only checkpoints and replay.
All three must end on bitwise-equal weights with equal per-step metrics.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tiny import TINY_RUN
from trace_rl.data_schemas import TRAIN_METRICS
from trace_rl.pipeline.layout import dataset_name
from trace_rl.stages import get_stage
from trace_rl.stages.common import open_store
from trace_rl.stages.config import load_config
from trace_rl.trainer.checkpoint import has_trainer_state
from trace_rl.trainer.resident import trainer_session

ROUNDS = 3


def _run(root, testbed: str, state_every: int, resident: bool):
    cfg = load_config("demo", TINY_RUN + [
        f"run.root={root}", f"model.testbed_dir={testbed}", f"run.rounds={ROUNDS}",
        f"train.state_every={state_every}", "eval.benchmarks=[]", "train.teacher_sync_every=3",
        "train.keep_checkpoints=null"])  # every checkpoint is compared across the three runs
    get_stage("prepare")(cfg, None, progress=False)
    with trainer_session() if resident else _nothing() as session:
        for k in range(ROUNDS):
            for stage in ("rollout", "verify", "annotate", "train"):
                get_stage(stage)(cfg, k, progress=False)
        reused = session.rounds_reused if session is not None else None
    return cfg, reused


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _final(cfg) -> dict[str, torch.Tensor]:
    store = open_store(cfg)
    return load_file(str(store.local_path("checkpoints", f"round-{ROUNDS:04d}", "model.safetensors")))


def _metrics(cfg) -> list[list]:
    store = open_store(cfg)
    out = []
    for k in range(ROUNDS):
        t = store.read(dataset_name("train", k), TRAIN_METRICS, allow_extra=True)
        out.append([t.column(c).to_pylist() for c in ("step", "loss", "kl_loss", "grad_norm")])
    return out


@pytest.mark.slow
def test_resident_cold_and_replayed_rounds_are_bitwise_equal(tmp_path, tiny_testbed_dir):
    resident, reused = _run(tmp_path / "resident", tiny_testbed_dir, 5, resident=True)
    full, _ = _run(tmp_path / "full", tiny_testbed_dir, 1, resident=False)
    replayed, _ = _run(tmp_path / "replayed", tiny_testbed_dir, 5, resident=False)

    assert reused == ROUNDS - 1, "rounds 1.. start from what the previous round left in memory"
    ref = _final(full)
    for run in (resident, replayed):
        got = _final(run)
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.equal(ref[name], got[name]), name
        assert _metrics(run) == _metrics(full)

    # Weights-only checkpoints in between; the full state at the run's last round.
    for run, expect in ((resident, [False, False, True]), (full, [True, True, True]),
                        (replayed, [False, False, True])):
        store = open_store(run)
        got = [has_trainer_state(store.local_path("checkpoints", f"round-{k:04d}"))
               for k in range(1, ROUNDS + 1)]
        assert got == expect, (run.run.root, got)
    store = open_store(replayed)
    replays = [store.manifest(dataset_name("train", k)).extra["replayed_rounds"] for k in range(ROUNDS)]
    assert replays == [0, 1, 2]
    store = open_store(resident)
    assert [store.manifest(dataset_name("train", k)).extra["replayed_rounds"]
            for k in range(ROUNDS)] == [0, 0, 0]


@pytest.mark.slow
def test_session_close_writes_the_state_a_cold_round_then_starts_from(tmp_path, tiny_testbed_dir):
    """A flow that stops after round 1 of 3 (rounds=2 here, run.rounds=3): on leaving the
    session the resident's optimizer goes into checkpoint 2, so round 2 run alone replays
    nothing, and ends where the uninterrupted cold run ends."""
    cfg = load_config("demo", TINY_RUN + [
        f"run.root={tmp_path / 'stopped'}", f"model.testbed_dir={tiny_testbed_dir}",
        f"run.rounds={ROUNDS}", "train.state_every=5", "eval.benchmarks=[]",
        "train.teacher_sync_every=3"])
    get_stage("prepare")(cfg, None, progress=False)
    with trainer_session():
        for k in range(2):
            for stage in ("rollout", "verify", "annotate", "train"):
                get_stage(stage)(cfg, k, progress=False)
    store = open_store(cfg)
    assert not has_trainer_state(store.local_path("checkpoints", "round-0001"))
    assert has_trainer_state(store.local_path("checkpoints", "round-0002"))
    for stage in ("rollout", "verify", "annotate", "train"):
        get_stage(stage)(cfg, 2, progress=False)
    assert store.manifest(dataset_name("train", 2)).extra["replayed_rounds"] == 0
    full, _ = _run(tmp_path / "full", tiny_testbed_dir, 1, resident=False)
    ref, got = _final(full), _final(cfg)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_resident_is_reused_only_for_its_checkpoint_and_config(tmp_path):
    """train_round with a Resident: the next round reuses what is held only when it starts from
    the checkpoint the held state equals and under the same config; the reused round's update
    equals the cold one from that checkpoint's full state on disk."""
    from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint
    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.resident import Resident
    from trace_rl.trainer.round import train_round

    tables = make_round_tables(make_tokenizer(), n_prompts=2, samples=4, seed=1)
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    base = dict(method="trace", route={"key_forward": True, "error_reverse": True},
                mini_batch_size=4, micro_batch_size=2, lr=1e-3, logprob_chunk=8,
                tensorboard=False, report_to=[])
    cfg, other = TrainConfig(**base), TrainConfig(**{**base, "lr": 5e-4})

    def step(c, src, dst, k, resident):
        train_round(c, **tables, init_checkpoint=str(src), output_checkpoint=str(tmp_path / dst),
                    work_dir=str(tmp_path / f"work-{dst}"), round_index=k, progress=False,
                    resident=resident)
        return tmp_path / dst

    res = Resident()
    c1 = step(cfg, init, "c1", 0, res)
    step(other, init, "elsewhere", 0, res)  # another start checkpoint: nothing to reuse
    assert res.rounds_reused == 0 and res.held.checkpoint == str(tmp_path / "elsewhere")
    step(cfg, tmp_path / "elsewhere", "c2-other-config", 1, res)  # same checkpoint, other config
    assert res.rounds_reused == 0
    res = Resident()
    step(cfg, init, "c1-again", 0, res)
    warm = step(cfg, tmp_path / "c1-again", "c2-warm", 1, res)
    assert res.rounds_reused == 1
    cold = step(cfg, c1, "c2-cold", 1, None)
    a, b = load_file(str(warm / "model.safetensors")), load_file(str(cold / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa = torch.load(warm / "trainer_state" / "state.pt", weights_only=False)
    sb = torch.load(cold / "trainer_state" / "state.pt", weights_only=False)
    assert sa["global_step"] == sb["global_step"] == 4  # 2 steps a round
    for i, st in sb["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], sa["optimizer"]["state"][i]["exp_avg"])
