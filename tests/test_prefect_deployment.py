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
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=ROOT, capture_output=True, check=False,
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
        schema = _api(env, "/deployments/filter", {})
        stage_dep = next(d for d in schema if d["name"] == "stage")
        props = stage_dep["parameter_openapi_schema"]
        assert props["properties"]["stage"]["enum"] == ["prepare", "rollout", "verify", "annotate",
                                                        "train", "evaluate"]
        assert props["properties"]["stage"]["description"]
        assert set(props["required"]) == {"stage", "config", "round_index"}
        assert props["properties"]["round_index"]["type"] == "integer"  # null is not an integer
        overrides = [f"run.root={run_root}", f"data.source={source}", "data.limit=40"]
        params = {"stage": "prepare", "config": "demo", "round_index": 0, "overrides": overrides}
        with background([sys.executable, "-m", "prefect", "worker", "start", "--pool", "trace-pool",
                         "--limit", "1"], env, tmp_path / "worker.log", ROOT):
            run_id = _run_deployment("trace-stage/stage", params, env)
            state = _wait_for_final_state(run_id, env)
            assert state == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-4000:])
            written = (run_root / "config.yaml").read_bytes()
            flow_run = _api(env, f"/flow_runs/{run_id}")
            assert flow_run["name"] == "demo · prepare"
            logs = _logs_until(env, run_id, "prepare: 40 rows")
            assert "prepare: 40 rows" in logs, logs
            # A misspelt stage and a missing or null round_index are refused at submission:
            # no flow run is made (none fails 20 s later with tracebacks).
            before = len(_api(env, "/flow_runs/filter", {}))
            for bad in ({**params, "stage": "verfy"},
                        {"stage": "verify", "config": str(run_root)},
                        {"stage": "verify", "config": str(run_root), "round_index": None}):
                proc = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "trace-stage/stage",
                                       "--params", json.dumps(bad)], env=env, cwd=ROOT, capture_output=True,
                                      text=True, timeout=180, check=False)
                assert proc.returncode != 0 or "UUID" not in proc.stdout, proc.stdout
            assert len(_api(env, "/flow_runs/filter", {})) == before
            # A config that would change the run's config.yaml fails the run and writes nothing.
            changed = {**params, "overrides": [*overrides[:2], "data.limit=30"]}
            run_id = _run_deployment("trace-stage/stage", changed, env)
            assert _wait_for_final_state(run_id, env) == "FAILED"
            logs = _logs_until(env, run_id, "data.limit: 40 -> 30")
            assert "data.limit: 40 -> 30" in logs, logs[-3000:]
        assert (run_root / "config.yaml").read_bytes() == written
    table = pq.read_table(run_root / "prompts" / "part-00000.parquet")
    assert table.num_rows == 40
    manifest = json.loads((run_root / "prompts" / ".manifest.json").read_text())
    assert manifest["rows"] == 40 and manifest["stage"] == "prepare"


def _logs_until(env: dict, run_id: str, needle: str, timeout: float = 30) -> str:
    """The flow run's log (the run's process ships its records a moment after it ends)."""
    deadline = time.time() + timeout
    while True:
        logs = "\n".join(x["message"] for x in _api(env, "/logs/filter",
                                                     {"logs": {"flow_run_id": {"any_": [run_id]}}}))
        if needle in logs or time.time() > deadline:
            return logs
        time.sleep(1)


def _run_deployment(name: str, params: dict, env: dict) -> str:
    out = _prefect(["deployment", "run", name, "--params", json.dumps(params)], env).stdout
    return next(line.split()[-1] for line in out.splitlines() if "UUID" in line)


def _api(env: dict, path: str, body: dict | None = None):
    """GET (or POST `body`) one REST endpoint of the test's server."""
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


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
