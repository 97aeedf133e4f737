"""Resume within a round after a real SIGKILL gives the same weights and metrics as a clean run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tiny import make_round_tables, make_tokenizer, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
DETERMINISTIC = ("step", "loss", "pg_loss", "kl_loss", "kl_weight", "entropy", "grad_norm",
                 "clip_frac", "span_token_frac", "lr", "teacher/step")

# Runs one round; with KILL_AT set, SIGKILLs itself right after the progress save that ends
# step KILL_AT (a real kill: no cleanup, no atexit, no flush).
SCRIPT = r"""
import json, os, signal, sys
import pyarrow.parquet as pq
import trace_rl.trainer.round as R
from trace_rl.trainer.config import TrainConfig
kill_at = int(os.environ.get("KILL_AT", "-1"))
original = R.save_progress
def save_then_die(*args, **kwargs):
    original(*args, **kwargs)
    if args[8] == kill_at:  # cursor = optimizer steps completed in this round
        os.kill(os.getpid(), signal.SIGKILL)
R.save_progress = save_then_die
a = json.loads(open(sys.argv[1]).read())
tables = {k: pq.read_table(a[k]) for k in ("prompts", "rollouts", "verdicts", "annotations")}
rows = R.train_round(TrainConfig(**a["config"]), **tables, init_checkpoint=a["init_checkpoint"],
                     output_checkpoint=a["output_checkpoint"], work_dir=a["work_dir"],
                     round_index=a["round_index"], progress=False)
open(a["metrics_out"], "w").write("".join(json.dumps(r) + "\n" for r in rows))
"""


def _args(tmp: Path, tag: str, init: str, paths: dict) -> Path:
    cfg = dict(method="trace", route={"key_forward": True, "error_reverse": True},
               mini_batch_size=2, micro_batch_size=1, lr=1e-3, logprob_chunk=8,
               teacher_sync_every=2, save_every=1, tensorboard=False,
               schedule={"hold_steps": 2, "zero_step": 5})
    args = {"config": cfg, **paths, "init_checkpoint": init,
            "output_checkpoint": str(tmp / f"out-{tag}"), "work_dir": str(tmp / f"work-{tag}"),
            "round_index": 0, "metrics_out": str(tmp / f"metrics-{tag}.jsonl")}
    f = tmp / f"args-{tag}.json"
    f.write_text(json.dumps(args))
    return f


def _run(args_file: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    if kill_at is not None:
        env["KILL_AT"] = str(kill_at)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(args_file)], env=env,
                          capture_output=True, text=True, check=False, timeout=600)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    tok = make_tokenizer()
    init = save_tiny_checkpoint(tmp_path / "ckpt0", seed=0)
    tables = make_round_tables(tok, n_prompts=3, samples=4, seed=2)  # 12 rollouts = 6 steps
    paths = {}
    for name, table in tables.items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, paths[name])

    clean = _run(_args(tmp_path, "clean", init, paths))
    assert clean.returncode == 0, clean.stderr[-3000:]

    resumed_args = _args(tmp_path, "resumed", init, paths)
    killed = _run(resumed_args, kill_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "out-resumed").exists()
    assert torch.load(tmp_path / "work-resumed/progress.pt", weights_only=False)["cursor"] == 3
    again = _run(resumed_args)
    assert again.returncode == 0, again.stderr[-3000:]

    rows_clean = [json.loads(x) for x in (tmp_path / "metrics-clean.jsonl").read_text().splitlines()]
    rows_res = [json.loads(x) for x in (tmp_path / "metrics-resumed.jsonl").read_text().splitlines()]
    assert len(rows_clean) == len(rows_res) == 6
    assert rows_clean[1]["kl_loss"] > 0 and rows_clean[-1]["kl_weight"] == 0
    # sync every 2 steps while λ > 0 (steps 0-4); the step-3 teacher comes back from the snapshot
    assert [r["teacher/step"] for r in rows_res] == [0, 0, 2, 2, 4, None]
    for a, b in zip(rows_clean, rows_res):
        for key in DETERMINISTIC:
            assert a[key] == b[key], (a["step"], key)
    wa = load_file(tmp_path / "out-clean/model.safetensors")
    wb = load_file(tmp_path / "out-resumed/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
