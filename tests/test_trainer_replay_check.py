"""A replayed round is checked against the checkpoint it once wrote: on every process, refused
beyond a stated tolerance, and its max |Δ| recorded in the train manifest.

- In one process: an untouched checkpoint gives Δ = 0; one nudged within the tolerance is copied
  into the model (the next rollouts came from it) and reported; one beyond it is refused.
- Through the train stage under `accelerate launch` (2 CPU processes, gloo, DDP): round 1 starts
  from a weights-only checkpoint, replays round 0 inside the launch, checks it on both processes
  and records Δ = 0 in its manifest.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TINY_RUN, make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.data_schemas import TRAIN_METRICS
from trace_rl.pipeline.layout import dataset_name
from trace_rl.stages import get_stage
from trace_rl.stages.common import open_store
from trace_rl.stages.config import load_config
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.resident import Resident
from trace_rl.trainer.round import train_round
from trace_rl.trainer.round_io import REPLAY_TOLERANCE, check_replayed


def test_replay_check_copies_within_tolerance_and_refuses_beyond(tmp_path):
    tables = make_round_tables(make_tokenizer(), n_prompts=2, samples=4, seed=1)
    init = save_tiny_checkpoint(tmp_path / "init", seed=0)
    cfg = TrainConfig(method="grpo", mini_batch_size=4, micro_batch_size=4, lr=1e-3,
                      logprob_chunk=16, tensorboard=False, report_to=[])
    c1 = tmp_path / "c1"

    def replay():
        res = Resident()
        train_round(cfg, **tables, init_checkpoint=init, output_checkpoint=str(c1),
                    work_dir=str(tmp_path / "w-replay"), round_index=0, progress=False,
                    resident=res, write_output=False)
        return res

    train_round(cfg, **tables, init_checkpoint=init, output_checkpoint=str(c1),
                work_dir=str(tmp_path / "w"), round_index=0, progress=False, save_state=False)
    assert check_replayed(replay()) == 0.0

    weights = load_file(str(c1 / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    nudged = dict(weights)
    nudged[name] = weights[name].clone()
    nudged[name][0, 0] += REPLAY_TOLERANCE / 4
    save_file(nudged, str(c1 / "model.safetensors"), metadata={"format": "pt"})
    res = replay()
    assert check_replayed(res) == pytest.approx(REPLAY_TOLERANCE / 4, rel=1e-3)
    live = dict(res.held.unwrapped.hf.named_parameters())[name]
    assert torch.equal(live.detach(), nudged[name])  # the checkpoint's weights, now in the model

    nudged[name][0, 0] += 2 * REPLAY_TOLERANCE
    save_file(nudged, str(c1 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="tolerance"):
        check_replayed(replay())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multi_process_replay_is_checked_and_recorded(tmp_path, tiny_testbed_dir, monkeypatch):
    # MULTI_GPU under ACCELERATE_USE_CPU: torchrun with gloo (use_cpu alone picks MPI)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    accel = tmp_path / "ddp_cpu.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                     "num_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\n"
                     "machine_rank: 0\n")
    cfg = load_config("demo", TINY_RUN + [
        f"run.root={tmp_path / 'run'}", f"model.testbed_dir={tiny_testbed_dir}", "run.rounds=2",
        "train.state_every=5", "eval.benchmarks=[]", "train.num_processes=2",
        f"train.accelerate_config={accel}"])
    get_stage("prepare")(cfg, None, progress=False)
    for k in range(2):
        for stage in ("rollout", "verify", "annotate", "train"):
            get_stage(stage)(cfg, k, progress=False)
    store = open_store(cfg)
    extras = [store.manifest(dataset_name("train", k)).extra for k in range(2)]
    assert [e["replayed_rounds"] for e in extras] == [0, 1]
    assert extras[0]["replay_max_abs_delta"] is None
    assert extras[1]["replay_max_abs_delta"] == 0.0
    assert store.read(dataset_name("train", 1), TRAIN_METRICS, allow_extra=True).num_rows > 0
