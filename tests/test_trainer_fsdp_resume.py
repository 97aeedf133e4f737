"""FSDP2 with 2 processes on CPU (gloo): train, save, resume in a fresh launch.

accelerate (1.15) does not shard on CPU: `accelerate launch --use_fsdp` with ACCELERATE_USE_CPU
leaves distributed_type MULTI_CPU and prepare() wraps the model in DistributedDataParallel. The
launched script therefore marks the state FSDP with an FSDP2 plugin itself, after which
accelerate's own fsdp2 preparation (fully_shard, DTensor parameters) runs on gloo.

A 4-step round is stopped right after the in-round progress save that ends step 2 (both
processes exit), then launched again on the same work dir: it must resume from the save, with
the sharded optimizer state scattered back, and end where an uninterrupted FSDP round ends (and
within tolerance of the single-process round).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round
from tiny import LEAVE_GROUP, make_round_tables, make_tokenizer, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
# 16 rollouts, 4 per optimizer step: 4 steps; each process takes 2 per step in one micro-batch
CONFIG = {"method": "trace", "route": {"key_forward": True, "error_reverse": True},
          "mini_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "logprob_chunk": 16,
          "save_every": 2, "tensorboard": False}
COMPARED = ("step", "loss", "pg_loss", "kl_loss", "kl_weight", "grad_norm", "teacher/step")

# One round; with STOP_AT, every process exits right after the progress save ending that step.
SCRIPT = r"""
import json, os, sys
from pathlib import Path
import pyarrow.parquet as pq
from accelerate import Accelerator
import trace_rl.trainer.round as R
from trace_rl.trainer.config import TrainConfig

a = json.loads(Path(sys.argv[1]).read_text())
stop_at = int(os.environ.get("STOP_AT", "-1"))
original = R.save_progress
def save_then_stop(*args, **kwargs):
    original(*args, **kwargs)  # ends with a barrier: the save is on disk for every process
    if args[8] == stop_at:  # cursor = optimizer steps completed in this round
        os._exit(0)
R.save_progress = save_then_stop
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
acc = Accelerator()
PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what acc reports
acc.state.distributed_type = DistributedType.FSDP
acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
    transformer_cls_names_to_wrap=["Qwen3DecoderLayer"], reshard_after_forward=True,
    state_dict_type="FULL_STATE_DICT")
tables = {k: pq.read_table(v) for k, v in a["tables"].items()}
rows = R.train_round(TrainConfig(**a["config"]), **tables, init_checkpoint=a["init"],
                     output_checkpoint=a["out"], work_dir=a["work"], round_index=0,
                     accelerator=acc, progress=False)
if acc.is_main_process:
    Path(a["metrics"]).write_text(json.dumps(rows))
"""

# --multi_gpu: torchrun with gloo under ACCELERATE_USE_CPU (--cpu alone picks MPI)
LAUNCH = ["--multi_gpu"]


def _launch(tmp: Path, tag: str, init: str, paths: dict, stop_at: int | None = None,
            config: dict | None = None) -> None:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's CLI must be installed next to the Python interpreter"
    script, args_file = tmp / "fsdp_round.py", tmp / f"args-{tag}.json"
    script.write_text(SCRIPT + LEAVE_GROUP)
    args_file.write_text(json.dumps({
        "config": config or CONFIG, "tables": paths, "init": init, "out": str(tmp / f"out-{tag}"),
        "work": str(tmp / f"work-{tag}"), "metrics": str(tmp / f"metrics-{tag}.json")}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    if stop_at is not None:
        env["STOP_AT"] = str(stop_at)
    cmd = [launcher, "launch", *LAUNCH, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(args_file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _adam(state: dict) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """{parameter name: (step, exp_avg, exp_avg_sq)} of a name-keyed (full_fqn) optimizer save."""
    return {name: (float(s["step"]), s["exp_avg"], s["exp_avg_sq"])
            for name, s in state["optimizer"]["state"].items()}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fsdp2_save_and_resume_matches_uninterrupted(tmp_path):
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    paths = {}
    for name, table in make_round_tables(make_tokenizer(), seed=5).items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, paths[name])

    _launch(tmp_path, "clean", init, paths)
    _launch(tmp_path, "resumed", init, paths, stop_at=2)
    assert not (tmp_path / "out-resumed").exists() and not (tmp_path / "metrics-resumed.json").exists()
    saved = torch.load(tmp_path / "work-resumed/progress.pt", weights_only=False)
    assert saved["cursor"] == 2 and saved["state_layout"] == "full_fqn"
    # the save holds whole (gathered) tensors, not one process's shard
    model0 = load_file(Path(init) / "model.safetensors")
    shapes = {k.removeprefix("hf."): tuple(v.shape) for k, v in saved["model"].items()}
    assert set(model0) <= set(shapes)
    assert all(shapes[k] == tuple(v.shape) for k, v in model0.items())
    adam2 = _adam(saved)
    assert adam2 and {step for step, _, _ in adam2.values()} == {2.0}
    _launch(tmp_path, "resumed", init, paths)

    rows_clean = json.loads((tmp_path / "metrics-clean.json").read_text())
    rows_res = json.loads((tmp_path / "metrics-resumed.json").read_text())
    assert len(rows_clean) == len(rows_res) == 4
    for a, b in zip(rows_clean, rows_res):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)

    # the optimizer came back: its moments continue from step 2 to the clean run's step 4
    end_clean = torch.load(tmp_path / "out-clean/trainer_state/state.pt", weights_only=False)
    end_res = torch.load(tmp_path / "out-resumed/trainer_state/state.pt", weights_only=False)
    assert end_res["state_layout"] == "full_fqn" and end_res["global_step"] == 4
    adam_c, adam_r = _adam(end_clean), _adam(end_res)
    assert adam_c.keys() == adam_r.keys() == adam2.keys()
    for name, (step, m, v) in adam_c.items():
        step_r, m_r, v_r = adam_r[name]
        assert step == step_r == 4.0, name
        torch.testing.assert_close(m_r, m, atol=1e-7, rtol=1e-4, msg=name)
        torch.testing.assert_close(v_r, v, atol=1e-10, rtol=1e-4, msg=name)

    w_clean = load_file(tmp_path / "out-clean/model.safetensors")
    w_res = load_file(tmp_path / "out-resumed/model.safetensors")
    tables = {k: pq.read_table(v) for k, v in paths.items()}
    rows_single = train_round(TrainConfig(**{**CONFIG, "micro_batch_size": 4}), **tables,
                              init_checkpoint=init, output_checkpoint=str(tmp_path / "out-single"),
                              work_dir=str(tmp_path / "work-single"), round_index=0,
                              progress=False)
    w_single = load_file(tmp_path / "out-single/model.safetensors")
    assert w_clean.keys() == w_res.keys() == w_single.keys()
    for k in w_clean:
        torch.testing.assert_close(w_res[k], w_clean[k], atol=1e-6, rtol=1e-5, msg=k)
        torch.testing.assert_close(w_res[k], w_single[k], atol=2e-5, rtol=1e-4, msg=k)
    for a, b in zip(rows_single, rows_res):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), a["step"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fsdp2_a_save_before_the_first_optimizer_step_changes_nothing(tmp_path):
    """The round's first mini-batch is all cut (`overlong: mask`), so the optimizer does not step
    and holds no state when the progress save after it is taken. torch's get_state_dict filled
    that state by a step at lr 0, which counted as an AdamW step: with saves the run ended at
    Adam step 4, without at 3, and the weights differed by as much as the round moved them."""
    import numpy as np
    import pyarrow as pa

    tables = make_round_tables(make_tokenizer(), seed=5)
    rows = tables["rollouts"].to_pylist()
    order = np.random.default_rng([0, 0]).permutation(len(rows))  # the round's order (seed 0)
    cut = {rows[i]["rollout_id"] for i in order[:4]}
    for r in rows:
        r["finish_reason"] = "length" if r["rollout_id"] in cut else "stop"
    tables["rollouts"] = pa.Table.from_pylist(rows, schema=tables["rollouts"].schema)
    paths = {}
    for name, table in tables.items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, paths[name])
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    base = {**CONFIG, "method": "grpo", "overlong": "mask"}
    base.pop("route")
    _launch(tmp_path, "nosave", init, paths, config={**base, "save_every": 0})
    _launch(tmp_path, "saved", init, paths, config={**base, "save_every": 1})
    _launch(tmp_path, "resumed", init, paths, stop_at=1, config={**base, "save_every": 1})
    assert torch.load(tmp_path / "work-resumed/progress.pt", weights_only=False)["optimizer"] is None
    _launch(tmp_path, "resumed", init, paths, config={**base, "save_every": 1})
    ref = json.loads((tmp_path / "metrics-nosave.json").read_text())
    assert ref[0]["grad_norm"] == 0.0 and ref[1]["grad_norm"] > 0
    weights = load_file(tmp_path / "out-nosave/model.safetensors")
    adam = _adam(torch.load(tmp_path / "out-nosave/trainer_state/state.pt", weights_only=False))
    assert {step for step, _, _ in adam.values()} == {3.0}  # 4 mini-batches, one trained nothing
    for tag in ("saved", "resumed"):
        got = json.loads((tmp_path / f"metrics-{tag}.json").read_text())
        assert [[r[k] for k in COMPARED] for r in got] == [[r[k] for k in COMPARED] for r in ref]
        other = load_file(tmp_path / f"out-{tag}/model.safetensors")
        assert all(torch.equal(other[k], v) for k, v in weights.items()), tag
        state = _adam(torch.load(tmp_path / f"out-{tag}/trainer_state/state.pt", weights_only=False))
        assert {step for step, _, _ in state.values()} == {3.0}, tag
        assert all(torch.equal(state[k][1], m) for k, (_, m, _) in adam.items()), tag
