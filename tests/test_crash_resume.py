"""Crash safety: `trace-rl run` SIGKILLed at points inside rollout, annotate and train, rerun each
time; the finished run must equal an uninterrupted one and no dataset may lose or repeat rows."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN
from data_schemas import ANNOTATIONS, ROLLOUTS, VERDICTS
from pipeline.store import RunStore

pytestmark = pytest.mark.slow

ROUNDS = 2


def _cli_run(root: Path, testbed: str, home: Path) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_HOME=str(home), TRACE_ISOLATE_STAGES="never", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "pipeline.cli", "run", "demo", *TINY_RUN, f"run.root={root}",
            f"model.testbed_dir={testbed}", f"run.rounds={ROUNDS}", "train.save_every=1",
            "eval.benchmarks=[]"]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / f"round-{ROUNDS:04d}" / "model.safetensors"))


def _in_stage(root: Path, stage: str, k: int) -> bool:
    """True while `stage` of round k is running: its inputs are complete, its output is not."""
    rd = root / f"round-{k:04d}"
    upstream = {"rollout": root / "prompts", "annotate": rd / "verdicts", "train": rd / "annotations"}[stage]
    own = {"rollout": rd / "rollouts", "annotate": rd / "annotations", "train": rd / "train"}[stage]
    return (upstream / "_manifest.json").exists() and not (own / "_manifest.json").exists()


def _manifests(root: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text())["finished_at"]
            for p in root.rglob("_manifest.json")}


def _check_datasets(root: Path) -> None:
    store = RunStore(str(root))
    for k in range(ROUNDS):
        ids = None
        for sub, schema in (("rollouts", ROLLOUTS), ("verdicts", VERDICTS), ("annotations", ANNOTATIONS)):
            name = f"round-{k:04d}/{sub}"
            if store.manifest(name) is None:
                continue
            table = store.read(name, schema)             # checks the manifest's row count too
            got = table.column("rollout_id").to_pylist()
            assert len(got) == len(set(got)), f"{name}: duplicated rollouts"
            if ids is None:
                ids = sorted(got)
            assert sorted(got) == ids, f"{name}: rollouts missing or extra"


def test_sigkill_at_random_points_then_resume(tmp_path, tiny_testbed_dir):
    rng = random.Random(1234)
    reference = tmp_path / "reference"
    proc = _cli_run(reference, tiny_testbed_dir, tmp_path / "prefect-ref")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]

    crashed = tmp_path / "crashed"
    points = [("rollout", 0), ("annotate", 0), ("train", 0), ("rollout", 1), ("train", 1)]
    kills = 0
    for stage, k in points:
        before = _manifests(crashed) if crashed.exists() else {}
        proc = _cli_run(crashed, tiny_testbed_dir, tmp_path / "prefect-crash")
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not _in_stage(crashed, stage, k):
            time.sleep(0.05)
        if proc.poll() is None:
            time.sleep(rng.uniform(0.0, 1.5))      # somewhere inside the stage
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        _check_datasets(crashed)
        after = _manifests(crashed)
        for name, finished in before.items():       # finished stages are never redone
            assert after.get(name) == finished, f"{name} was redone after a crash"
    assert kills >= 5, f"only {kills} kills landed inside the run"

    proc = _cli_run(crashed, tiny_testbed_dir, tmp_path / "prefect-crash")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]
    _check_datasets(crashed)
    ref_w, got_w = _weights(reference), _weights(crashed)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), f"{name} differs from the uninterrupted run"
    for k in range(ROUNDS):
        a = (reference / f"round-{k:04d}" / "train" / "metrics.parquet")
        b = (crashed / f"round-{k:04d}" / "train" / "metrics.parquet")
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(a), pq.read_table(b)
        for col in ("step", "loss", "pg_loss", "kl_loss", "kl_weight", "grad_norm"):
            assert ta.column(col).to_pylist() == tb.column(col).to_pylist(), (k, col)
