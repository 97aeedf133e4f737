"""A real Prefect server on 127.0.0.1: deploy prefect.yaml, run a deployment with parameters
through the CLI, wait for Completed, and read back the Parquet it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from prefect_server import background, prefect_env, prefect_server

pytestmark = pytest.mark.slow


def _prefect(args: list[str], env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_deploy_and_run_stage_deployment(tmp_path):
    home = tmp_path / "prefect"
    home.mkdir()
    run_root = tmp_path / "run"
    # A GSM8K-shaped local file (synthetic rows): the deployment runs with what the repo holds.
    source = tmp_path / "gsm8k_like.jsonl"
    source.write_text("".join(json.dumps({"id": f"g{i}", "problem": f"What is {i}+{i}?", "answer": str(2 * i),
                                          "solution": f"{i}+{i}={2 * i}"}) + "\n" for i in range(50)))
    with prefect_server(home, tmp_path / "server.log") as api:
        env = prefect_env(home, api)
        _prefect(["work-pool", "create", "trace-pool", "--type", "process"], env)
        _prefect(["deploy", "--all"], env)
        listed = _prefect(["deployment", "ls"], env).stdout
        for name in ("trace-training/training", "trace-round/round", "trace-stage/stage", "trace-evaluate/evaluate"):
            assert name in listed, listed
        params = {"stage": "prepare", "config": "demo",
                  "overrides": [f"run.root={run_root}", f"data.source={source}",
                                "data.limit=40"]}
        with background([sys.executable, "-m", "prefect", "worker", "start", "--pool", "trace-pool",
                         "--limit", "1"], env, tmp_path / "worker.log", ROOT):
            out = _prefect(["deployment", "run", "trace-stage/stage", "--params", json.dumps(params)], env).stdout
            run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
            state = _wait_for_final_state(run_id, env)
        assert state == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-4000:])
    table = pq.read_table(run_root / "prompts" / "part-00000.parquet")
    assert table.num_rows == 40
    manifest = json.loads((run_root / "prompts" / "_manifest.json").read_text())
    assert manifest["rows"] == 40 and manifest["stage"] == "prepare"


def _wait_for_final_state(run_id: str, env: dict, timeout: float = 240) -> str:
    """Poll the server's REST API for the flow run's state type."""
    import urllib.request

    deadline = time.time() + timeout
    state = "NONE"
    while time.time() < deadline:
        with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=10) as r:
            state = (json.loads(r.read()).get("state") or {}).get("type", "NONE")
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    return state
