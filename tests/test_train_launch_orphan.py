"""The train stage's own per-round launch (no resident group: `train.persistent=false`, or the
group died) belongs to its flow, as the worker group does (issue 26 item 2). Before, it was a bare
`subprocess.run`: a SIGKILLed flow left the launch training and writing into the run, and the
stage read `metrics.jsonl` whoever wrote it.

- SIGKILL the flow while its launch trains round 0: every launch process is gone within 10 s, no
  answer is written for the dead flow, and the rerun's round equals an uninterrupted one bitwise.
- An answer with another nonce (an orphan's, written where this launch's would be) is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny import TINY_RUN
from trace_rl.data_schemas.errors import StageError
from trace_rl.pipeline.layout import start_checkpoint_dir
from trace_rl.stages import get_stage
from trace_rl.stages.common import open_store
from trace_rl.stages.config import load_config

REPO = Path(__file__).resolve().parents[1]

DRIVER = r"""
import sys
from trace_rl.stages import get_stage
from trace_rl.stages.config import load_config
get_stage("train")(load_config("demo", sys.argv[1:]), 0, progress=False)
"""


def _overrides(tmp_path, testbed, run: str) -> list[str]:
    accel = tmp_path / "ddp_cpu.yaml"  # MULTI_GPU under ACCELERATE_USE_CPU: torchrun on gloo
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                     "num_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\nmachine_rank: 0\n")
    return TINY_RUN + [f"run.root={tmp_path / run}", f"model.testbed_dir={testbed}", "run.rounds=1",
                       "eval.benchmarks=[]", "train.num_processes=2", "train.persistent=false",
                       f"train.accelerate_config={accel}", "train.tensorboard=false"]


def _prepared(tmp_path, testbed, run: str):
    cfg = load_config("demo", _overrides(tmp_path, testbed, run))
    get_stage("prepare")(cfg, None, progress=False)
    for stage in ("rollout", "verify", "annotate"):
        get_stage(stage)(cfg, 0, progress=False)
    return cfg


def _live(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    found, grew = {pid}, True
    while grew:
        grew = False
        for d in Path("/proc").glob("[0-9]*"):
            try:
                ppid = int(Path(f"/proc/{d.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            if ppid in found and int(d.name) not in found and _live(int(d.name)):
                found.add(int(d.name))
                grew = True
    return found - {pid}


def _weights(cfg):
    return load_file(str(open_store(cfg).local_path(start_checkpoint_dir(1)) / "model.safetensors"))


@pytest.fixture
def cpu_gloo(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_flows_launch_dies_and_the_rerun_equals_the_uninterrupted_run(tmp_path, tiny_testbed_dir,
                                                                                cpu_gloo):
    cfg = _prepared(tmp_path, tiny_testbed_dir, "killed")
    (tmp_path / "driver.py").write_text(DRIVER)
    flow = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), *_overrides(tmp_path, tiny_testbed_dir,
                                                                                        "killed")])
    # mid-round: both trainer processes run (launcher + 2 ranks under the flow) and the round has
    # loaded its datasets (its scratch exists)
    deadline = time.monotonic() + 300
    while len(_descendants(flow.pid)) < 3 or not list((tmp_path / "killed").rglob("launch_args.json")):
        assert flow.poll() is None and time.monotonic() < deadline, "the round never started"
        time.sleep(0.1)
    time.sleep(3)
    launch = _descendants(flow.pid)
    t0 = time.monotonic()
    flow.send_signal(signal.SIGKILL)
    flow.wait()
    while any(map(_live, launch)) and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    lifetime = time.monotonic() - t0
    print(f"the per-round launch ({len(launch)} processes) ended {lifetime:.1f} s after its flow's SIGKILL")
    assert not any(map(_live, launch)), f"the launch outlived its flow by {lifetime:.0f} s"
    assert lifetime < 10
    assert not list((tmp_path / "killed").rglob("answer.json")), "the orphan answered its dead flow"

    get_stage("train")(cfg, 0, progress=False)  # the rerun, in this process
    clean = _prepared(tmp_path, tiny_testbed_dir, "clean")
    get_stage("train")(clean, 0, progress=False)
    got, want = _weights(cfg), _weights(clean)
    assert got.keys() == want.keys()
    assert all(got[k].equal(want[k]) for k in want)


# Stands in for `accelerate launch ... -m trace_rl.trainer.launch --args-json A.json`: answers
# like a launch, but with the nonce of another flow (an orphan's answer in this launch's place).
FOREIGN = r"""
import json, sys
from pathlib import Path
args = json.loads(Path(sys.argv[sys.argv.index("--args-json") + 1]).read_text())
out = Path(args["metrics_out"])
out.write_text("")
out.with_name("answer.json").write_text(json.dumps({"nonce": "0rphan", "rows": [],
                                                    "replay_max_abs_delta": None}))
"""


def test_an_answer_with_another_nonce_is_refused(tmp_path, monkeypatch):
    import trace_rl.stages.train as train

    script = tmp_path / "foreign.py"
    script.write_text(FOREIGN)
    monkeypatch.setattr(train, "launch_prefix", lambda _t: [sys.executable, str(script)])
    cfg = load_config("demo", ["train.num_processes=2"])
    work = tmp_path / "work"
    work.mkdir()
    args = {"round_index": 3, "replay": [], "metrics_out": str(work / "metrics.jsonl")}
    with pytest.raises(StageError, match="carries nonce '0rphan'"):
        train._launch_accelerate(cfg, args, work)
    sent = json.loads((work / "launch_args.json").read_text())
    assert sent["parent_pid"] == os.getpid() and len(sent["nonce"]) == 12 and sent["nonce"] != "0rphan"
    assert sent["parent_id"]  # the flow's boot id and start time: a reused pid is not the flow


def test_a_launch_without_an_answer_is_refused(tmp_path, monkeypatch):
    """An exit 0 that wrote nothing (the stage used to read whatever metrics.jsonl held)."""
    import trace_rl.stages.train as train

    (tmp_path / "silent.py").write_text("")
    monkeypatch.setattr(train, "launch_prefix", lambda _t: [sys.executable, str(tmp_path / "silent.py")])
    work = tmp_path / "work"
    work.mkdir()
    (work / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")  # an earlier launch's rows
    (work / "answer.json").write_text(json.dumps({"nonce": "old", "rows": [{"step": 0}]}))
    args = {"round_index": 0, "replay": [], "metrics_out": str(work / "metrics.jsonl")}
    with pytest.raises(StageError, match="without its answer"):
        train._launch_accelerate(load_config("demo", ["train.num_processes=2"]), args, work)
