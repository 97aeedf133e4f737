"""Every pass of a round under FSDP2 full sharding (2 CPU processes, gloo), in bf16 compute over
float32 sharded parameters: the lean policy forward (lm_head read inside the sharded root's
forward), the live teacher (`teacher_sync_every: 0`: the student's own sharded forward and head
under no_grad) and the old-log-prob pass of later steps. The round must end within bf16
tolerance of the single-process round, and its checkpoint must hold bf16 weights with the
gathered float32 master in its trainer state. The round is then replayed into a resident and
checked against that checkpoint on both processes (check_replayed on sharded parameters).

The launch is tests/test_trainer_fsdp_resume.py's (accelerate's FSDP2 preparation forced on CPU).
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
from test_trainer_fsdp_resume import SCRIPT
from tiny import LEAVE_GROUP, make_round_tables, make_tokenizer, save_tiny_checkpoint
from trace_rl.trainer.config import TrainConfig
from trace_rl.trainer.round import train_round

REPO = Path(__file__).resolve().parents[1]
# 16 rollouts, 8 per optimizer step: 2 steps, the second with recomputed old log-probs
CONFIG = {"method": "trace", "route": {"key_forward": True, "error_reverse": True},
          "mini_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "logprob_chunk": 16,
          "teacher_sync_every": 0, "dtype": "bfloat16", "tensorboard": False, "report_to": []}


# Then the same round replayed into a resident (weights-only, as a cold start would) and checked
# against the checkpoint it wrote, on both processes: sharded parameters compared whole.
REPLAY = r"""
from trace_rl.trainer.resident import Resident
from trace_rl.trainer.round_io import check_replayed
res = Resident()
R.train_round(TrainConfig(**a["config"]), **tables, init_checkpoint=a["init"],
              output_checkpoint=a["out"], work_dir=a["work"] + "-replay", round_index=0,
              accelerator=acc, progress=False, resident=res, write_output=False)
worst = check_replayed(res)
Path(a["metrics"] + f".replay{acc.process_index}").write_text(json.dumps(worst))
"""


def _launch(tmp: Path, init: str, paths: dict) -> None:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's CLI must be installed next to the Python interpreter"
    script, args_file = tmp / "fsdp_round.py", tmp / "args.json"
    script.write_text(SCRIPT + REPLAY + LEAVE_GROUP)
    args_file.write_text(json.dumps({
        "config": CONFIG, "tables": paths, "init": init, "out": str(tmp / "out-fsdp"),
        "work": str(tmp / "work-fsdp"), "metrics": str(tmp / "metrics-fsdp.json")}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(args_file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp2_bf16_live_teacher_and_old_logprobs_match_single_process(tmp_path):
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    paths = {}
    for name, table in make_round_tables(make_tokenizer(), seed=5).items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, paths[name])
    _launch(tmp_path, init, paths)
    rows_fsdp = json.loads((tmp_path / "metrics-fsdp.json").read_text())
    # the replay check ran on both processes and found the replay equal to the checkpoint
    replays = [json.loads((tmp_path / f"metrics-fsdp.json.replay{r}").read_text()) for r in (0, 1)]
    assert replays == [0.0, 0.0], replays

    tables = {k: pq.read_table(v) for k, v in paths.items()}
    rows_single = train_round(TrainConfig(**CONFIG), **tables, init_checkpoint=init,
                              output_checkpoint=str(tmp_path / "out-single"),
                              work_dir=str(tmp_path / "work-single"), round_index=0,
                              progress=False)
    assert len(rows_fsdp) == len(rows_single) == 2
    assert all(r["kl_loss"] > 0 for r in rows_fsdp)  # the live teacher's divergence was in use
    for a, b in zip(rows_single, rows_fsdp):
        for key in ("loss", "pg_loss", "kl_loss", "grad_norm", "clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=2e-3), (a["step"], key)

    state = torch.load(tmp_path / "out-fsdp/trainer_state/state.pt", weights_only=False)
    assert state["state_layout"] == "full_fqn"  # gathered from shards
    single = torch.load(tmp_path / "out-single/trainer_state/state.pt", weights_only=False)
    assert state["master"].keys() == single["master"].keys()
    init_w = load_file(Path(init) / "model.safetensors")
    for k, v in single["master"].items():
        assert state["master"][k].dtype == torch.float32 and state["master"][k].shape == v.shape
    names = sorted(k for k in single["master"] if k.removeprefix("hf.") in init_w)
    u_single = torch.cat([(single["master"][k] - init_w[k.removeprefix("hf.")]).flatten()
                          for k in names])
    u_fsdp = torch.cat([(state["master"][k] - init_w[k.removeprefix("hf.")]).flatten()
                        for k in names])
    # the two runs' updates agree within bf16 compute noise (Adam normalises tiny gradients, so
    # single entries may differ by up to 2 lr per step; the update as a whole does not)
    rel = float((u_fsdp - u_single).norm() / u_single.norm())
    print("fsdp vs single-process update: relative difference", rel)
    assert rel < 0.1, rel
    disk = load_file(tmp_path / "out-fsdp/model.safetensors")
    assert {t.dtype for t in disk.values()} == {torch.bfloat16}
