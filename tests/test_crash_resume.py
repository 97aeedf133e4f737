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

from conftest import ROOT
from tiny import TINY_RUN
from trace_rl.data_schemas import ANNOTATIONS, ROLLOUTS, VERDICTS
from trace_rl.pipeline.store import RunStore

pytestmark = pytest.mark.slow

ROUNDS = 2


API_KEY = "sk-crash-test-0123456789"


def _cli_run(root: Path, testbed: str, home: Path, api_url: str) -> subprocess.Popen:
    # The annotator is a real OpenAI-compatible HTTP server with 0.3 s per request and two
    # requests in flight, so the annotate stage lasts long enough to be killed inside.
    env = dict(os.environ, PREFECT_HOME=str(home), TRACE_ISOLATE_STAGES="never", OMP_NUM_THREADS="1",
               CRASH_TEST_KEY=API_KEY)
    args = [sys.executable, "-m", "trace_rl.flows.cli", "run", "demo", *TINY_RUN, f"run.root={root}",
            f"model.testbed_dir={testbed}", f"run.rounds={ROUNDS}", "train.save_every=1",
            "eval.benchmarks=[]", "annotate.backend=api", f"annotate.api.base_url={api_url}",
            "annotate.api.api_key_env=CRASH_TEST_KEY", "annotate.api.concurrency=2",
            "annotate.api.model=fake-annotator"]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / f"round-{ROUNDS:04d}" / "model.safetensors"))


def _in_stage(root: Path, stage: str, k: int) -> bool:
    """True while `stage` of round k is running: its inputs are complete, its output is not."""
    rd = root / f"round-{k:04d}"
    upstream = {"rollout": root / "prompts", "annotate": rd / "verdicts", "train": rd / "annotations"}[stage]
    own = {"rollout": rd / "rollouts", "annotate": rd / "annotations", "train": rd / "train"}[stage]
    return (upstream / ".manifest.json").exists() and not (own / ".manifest.json").exists()


def _manifests(root: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text())["finished_at"]
            for p in root.rglob(".manifest.json")}


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


@pytest.fixture()
def annotator():
    from openai_fake_server import FakeOpenAI

    with FakeOpenAI(latency_s=0.3) as server:
        yield server


def test_sigkill_at_random_points_then_resume(tmp_path, tiny_testbed_dir, annotator):
    rng = random.Random(1234)
    url = annotator.base_url
    reference = tmp_path / "reference"
    proc = _cli_run(reference, tiny_testbed_dir, tmp_path / "prefect-ref", url)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]

    crashed = tmp_path / "crashed"
    points = [("rollout", 0), ("annotate", 0), ("train", 0), ("rollout", 1), ("train", 1)]
    kills = 0
    for stage, k in points:
        before = _manifests(crashed) if crashed.exists() else {}
        proc = _cli_run(crashed, tiny_testbed_dir, tmp_path / "prefect-crash", url)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not _in_stage(crashed, stage, k):
            time.sleep(0.05)
        if proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.8))      # somewhere inside the stage
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        _check_datasets(crashed)
        after = _manifests(crashed)
        for name, finished in before.items():       # finished stages are never redone
            assert after.get(name) == finished, f"{name} was redone after a crash"
    assert kills >= 5, f"only {kills} kills landed inside the run"

    proc = _cli_run(crashed, tiny_testbed_dir, tmp_path / "prefect-crash", url)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]
    _check_datasets(crashed)
    ref_w, got_w = _weights(reference), _weights(crashed)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), f"{name} differs from the uninterrupted run"
    for path in crashed.rglob("*"):                  # the key reached the server, never the disk
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    for k in range(ROUNDS):
        a = (reference / f"round-{k:04d}" / "train" / "metrics.parquet")
        b = (crashed / f"round-{k:04d}" / "train" / "metrics.parquet")
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(a), pq.read_table(b)
        for col in ("step", "loss", "pg_loss", "kl_loss", "kl_weight", "grad_norm"):
            assert ta.column(col).to_pylist() == tb.column(col).to_pylist(), (k, col)
