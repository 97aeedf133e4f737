"""`accelerate launch --num_processes 2` on CPU (gloo DDP) matches the single-process round."""

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

from trace_rl.trainer.testing import make_round_tables, make_tokenizer, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("step", "loss", "pg_loss", "kl_loss", "kl_weight", "entropy", "grad_norm",
            "response_len_mean", "span_token_frac", "clip_frac")


def _write_args(tmp: Path, tag: str, init: str, paths: dict) -> Path:
    cfg = dict(method="trace", route={"key_forward": True, "error_reverse": True},
               mini_batch_size=8, micro_batch_size=2, lr=1e-3, logprob_chunk=16,
               tensorboard=tag == "ddp")
    args = {"config": cfg, **paths, "init_checkpoint": init,
            "output_checkpoint": str(tmp / f"out-{tag}"), "work_dir": str(tmp / f"work-{tag}"),
            "round_index": 0, "metrics_out": str(tmp / f"metrics-{tag}.jsonl")}
    f = tmp / f"args-{tag}.json"
    f.write_text(json.dumps(args))
    return f


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_ddp_matches_single(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's CLI must be installed next to the Python interpreter"
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    paths = {}
    for name, table in make_round_tables(make_tokenizer(), seed=5).items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, paths[name])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "trace_rl.trainer.launch", "--args-json",
                             str(_write_args(tmp_path, "single", init, paths))],
                            env=env, capture_output=True, text=True, check=False, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    # --cpu alone selects accelerate's MPI launcher; torchrun + ACCELERATE_USE_CPU gives gloo DDP
    ddp = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "-m", "trace_rl.trainer.launch", "--args-json",
                          str(_write_args(tmp_path, "ddp", init, paths))],
                         env={**env, "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                         text=True, check=False, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # each rank recomputes the old log-probs of its own shard: two files prove two processes
    assert (tmp_path / "work-ddp/old_logprobs-rank1.pt").exists()

    rows_s = [json.loads(x) for x in (tmp_path / "metrics-single.jsonl").read_text().splitlines()]
    rows_d = [json.loads(x) for x in (tmp_path / "metrics-ddp.jsonl").read_text().splitlines()]
    assert len(rows_s) == len(rows_d) == 2
    for a, b in zip(rows_s, rows_d):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert rows_d[0]["kl_loss"] > 0
    assert any((tmp_path / "work-ddp/tensorboard").rglob("events.out.tfevents*"))
    ws, wd = load_file(tmp_path / "out-single/model.safetensors"), load_file(
        tmp_path / "out-ddp/model.safetensors")
    assert ws.keys() == wd.keys()
    for k in ws:
        torch.testing.assert_close(ws[k], wd[k], atol=2e-5, rtol=1e-4)
