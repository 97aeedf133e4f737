"""One resident trainer across processes (trainer/worker_group.py): 2 CPU processes on gloo.

A 3-round run whose train stages go to a worker group launched once: 1 launch (the group's own
launch log), 0 replays (the train manifests), and the final weights equal to a single-process
trainer that keeps its model and optimizer across the same rounds' datasets. Under DDP and under
FSDP2 (accelerate's FSDP2 preparation forced on CPU, as in tests/test_trainer_fsdp_resume.py).
Then the group is killed: the next stage falls back to a launch of its own that replays from the
last full state and checks the replay (Δ recorded in the manifest).
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_RUN
from trace_rl.pipeline.layout import dataset_name, start_checkpoint_dir
from trace_rl.pipeline.progress_lines import PROGRESS_LOGGER
from trace_rl.stages import get_stage
from trace_rl.stages.common import open_store, start_checkpoint
from trace_rl.stages.config import load_config
from trace_rl.trainer.launch import read_round_inputs
from trace_rl.trainer.resident import Resident
from trace_rl.trainer.round import train_round
from trace_rl.trainer.group_handle import trainer_group_session
from trace_rl.trainer.worker_group import LAUNCHES

REPO = Path(__file__).resolve().parents[1]

# The group's entry point with accelerate's FSDP2 preparation forced (it does not shard on CPU).
FSDP_GROUP = r"""
import sys
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from trace_rl.trainer.worker_group import main
acc = Accelerator()
PartialState._shared_state["distributed_type"] = DistributedType.FSDP
acc.state.distributed_type = DistributedType.FSDP
acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
    transformer_cls_names_to_wrap=["Qwen3DecoderLayer"], reshard_after_forward=True,
    state_dict_type="FULL_STATE_DICT")
main(sys.argv[1:], accelerator=acc)
"""


def _config(tmp_path, testbed, rounds):
    accel = tmp_path / "ddp_cpu.yaml"  # MULTI_GPU under ACCELERATE_USE_CPU: torchrun on gloo
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                     "num_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\nmachine_rank: 0\n")
    return load_config("demo", TINY_RUN + [
        f"run.root={tmp_path / 'run'}", f"model.testbed_dir={testbed}", f"run.rounds={rounds}",
        "train.state_every=5", "eval.benchmarks=[]", "train.num_processes=2",
        f"train.accelerate_config={accel}", "train.tensorboard=false"])


def _round(cfg, k):
    for stage in ("rollout", "verify", "annotate", "train"):
        get_stage(stage)(cfg, k, progress=False)


def _single_process_weights(cfg, store, rounds, tmp_path):
    """The same rounds' datasets trained in one process with the model and optimizer held."""
    res = Resident()
    init = start_checkpoint(cfg, store, 0)[0]
    for k in range(rounds):
        out = str(tmp_path / f"single-{k + 1}")
        train_round(cfg.train.model_copy(update={"micro_batch_size": 8}), **read_round_inputs(store, k),
                    init_checkpoint=init, output_checkpoint=out, work_dir=str(tmp_path / f"sw-{k}"),
                    round_index=k, progress=False, resident=res)
        init = out
    res.clear()
    return load_file(str(Path(init) / "model.safetensors"))


@pytest.fixture
def cpu_gloo(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_three_rounds_one_launch_no_replay(tmp_path, tiny_testbed_dir, cpu_gloo, backend, caplog):
    cfg = _config(tmp_path, tiny_testbed_dir, rounds=3)
    program = None
    if backend == "fsdp2":
        (tmp_path / "fsdp_group.py").write_text(FSDP_GROUP)
        program = [str(tmp_path / "fsdp_group.py")]
    get_stage("prepare")(cfg, None, progress=False)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER), trainer_group_session(cfg, program) as group:
        for k in range(3):
            _round(cfg, k)
        proc = group.proc
    assert proc.poll() == 0  # stopped by the session, cleanly
    # rank 0's progress lines came back into this process's log, where a flow forwards them
    progress = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert [p.split(" · ")[0] for p in progress if "2/2 steps" in p] == [f"train r{k}: 2/2 steps" for k in range(3)]
    launches = (group.dir / LAUNCHES).read_text().splitlines()
    assert len(launches) == 1 and json.loads(launches[0])["processes"] == 2
    store = open_store(cfg)
    extras = [store.manifest(dataset_name("train", k)).extra for k in range(3)]
    assert [e["replayed_rounds"] for e in extras] == [0, 0, 0]
    assert [e["trainer_state"] for e in extras] == [False, False, True]
    assert not list(store.local_path("scratch").glob("round-*/train-*/launch_args.json"))  # no own launch
    last = store.local_path(start_checkpoint_dir(3))
    state = torch.load(last / "trainer_state/state.pt", weights_only=False)
    assert state["global_step"] == 6  # 2 steps a round, one optimizer across the 3 rounds
    assert (state.get("state_layout") == "full_fqn") == (backend == "fsdp2")  # FSDP2: gathered shards
    final = load_file(str(last / "model.safetensors"))
    single = _single_process_weights(cfg, store, 3, tmp_path)
    assert final.keys() == single.keys()
    for name in final:
        torch.testing.assert_close(final[name], single[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dead_group_falls_back_to_a_checked_cold_start(tmp_path, tiny_testbed_dir, cpu_gloo):
    cfg = _config(tmp_path, tiny_testbed_dir, rounds=2)
    get_stage("prepare")(cfg, None, progress=False)
    with trainer_group_session(cfg) as group:
        _round(cfg, 0)
        os.killpg(group.proc.pid, signal.SIGKILL)  # the group dies between rounds
        group.proc.wait(30)
        _round(cfg, 1)
        assert group.dead
    store = open_store(cfg)
    extras = [store.manifest(dataset_name("train", k)).extra for k in range(2)]
    # round 0's checkpoint holds weights only: the cold start replays round 0 and checks it
    assert [e["replayed_rounds"] for e in extras] == [0, 1]
    assert extras[1]["replay_max_abs_delta"] == 0.0
    assert len((group.dir / LAUNCHES).read_text().splitlines()) == 1
    # round 1 ran in a launch of its own
    assert list((store.local_path("scratch") / "round-0001").glob("train-*/launch_args.json"))


# A flow stand-in: starts the group (an offload request waits for it to answer), prints the
# group's process-group id, then waits to be interrupted.
FLOW = r"""
import signal, sys, time
# Ctrl-C as in a terminal: a process started in the background by a non-interactive shell (a
# CI runner's `cmd &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
from trace_rl.stages.config import load_config
from trace_rl.trainer.group_handle import trainer_group_session
cfg = load_config("demo", sys.argv[1:])
with trainer_group_session(cfg) as group:
    assert group.request("offload", {})["offload"] == "nothing held"  # starts the group
    print(group.proc.pid, flush=True)
    time.sleep(600)
"""


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); None: gone or zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields


def _tree(pid: int) -> set[int]:
    """`pid` and its live descendants (torchrun starts each worker in a session of its own)."""
    tree, grew = {pid}, True
    while grew:
        grew = False
        for d in Path("/proc").glob("[0-9]*"):
            f = _stat(int(d.name))
            if f and int(f[1]) in tree and int(d.name) not in tree:
                tree.add(int(d.name))
                grew = True
    return tree


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_interrupted_flow_ends_its_group(tmp_path, tiny_testbed_dir, cpu_gloo, sig):
    import time

    cfg = _config(tmp_path, tiny_testbed_dir, rounds=1)  # writes the accelerate config
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    child = subprocess.Popen([sys.executable, str(flow), *TINY_RUN, f"run.root={tmp_path / 'run'}",
                              "train.num_processes=2", f"train.accelerate_config={cfg.train.accelerate_config}"],
                             stdout=subprocess.PIPE, text=True)
    group = _tree(int(child.stdout.readline()))
    assert len(group) >= 3  # the launcher and its 2 trainer processes

    def live():
        return [pid for pid in group if _stat(pid)]

    t0 = time.monotonic()
    child.send_signal(sig)  # SIGKILL: the flow runs no cleanup; the group notices it is gone
    child.wait(60)
    while live() and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    assert not live(), f"the trainer group outlived the flow by {time.monotonic() - t0:.0f} s"
    print(f"group gone {time.monotonic() - t0:.1f} s after the flow's {sig.name}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_round_ends_the_group_with_its_traceback(tmp_path, tiny_testbed_dir, cpu_gloo):
    from trace_rl.data_schemas.errors import StageError

    cfg = _config(tmp_path, tiny_testbed_dir, rounds=1)
    with trainer_group_session(cfg) as group:
        # a round whose arguments name no run: every process raises before any collective
        with pytest.raises(StageError, match=r"round-0 failed in the trainer group:(.|\n)*KeyError: 'run_root'"):
            group.train(0, {"round_index": 0, "init_checkpoint": str(tmp_path)}, resident_ok=False)
        assert group.dead and group.proc.poll() not in (None, 0)
        assert group.offload() == "no trainer group running"


def _benchmark(name: str):
    """A script of benchmarks/ as a module (its harness is the test's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_group_takes_only_its_flows_requests_and_stops(tmp_path):
    """Requests and stops are named with the flow's nonce; another flow's (an orphan's or a
    restarted flow's) files are left alone."""
    from trace_rl.trainer.worker_group import _next_message, write_json

    launcher = os.getppid()
    write_json(tmp_path / "0001-0ther0nce000-offload.json", {"kind": "offload", "nonce": "0ther0nce000"})
    write_json(tmp_path / "stop.json", {"save": False})
    write_json(tmp_path / "stop-0ther0nce000.json", {"save": False})
    assert _next_message(tmp_path, (None, None), launcher, "a1b2c3d4e5f6") == {"kind": "noop"}
    write_json(tmp_path / "0002-a1b2c3d4e5f6-round-3.json", {"kind": "round", "nonce": "a1b2c3d4e5f6"})
    msg = _next_message(tmp_path, (None, None), launcher, "a1b2c3d4e5f6")
    assert msg["name"] == "0002-a1b2c3d4e5f6-round-3" and msg["kind"] == "round"
    assert (tmp_path / "0002-a1b2c3d4e5f6-round-3.taken").exists()
    assert (tmp_path / "0001-0ther0nce000-offload.json").exists()  # never taken
    write_json(tmp_path / "stop-a1b2c3d4e5f6.json", {"save": True})
    assert _next_message(tmp_path, (None, None), launcher, "a1b2c3d4e5f6")["save"] is True
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "is gone" in _next_message(tmp_path, (dead.pid, None), launcher, "a1b2c3d4e5f6")["why"]


# Answers every request under its own name, but with another flow's nonce: an orphan's answer.
FOREIGN = r"""
import json, os, sys, time
from pathlib import Path
d = Path(sys.argv[1])
while True:
    for p in d.glob("[0-9][0-9][0-9][0-9]-*.json"):
        if not p.name.endswith(".done.json"):
            os.replace(p, p.with_suffix(".taken"))
            (d / (p.stem + ".done.json")).write_text(json.dumps({"offload": "x", "nonce": "0ther0nce000"}))
    time.sleep(0.05)
"""


def test_an_answer_with_another_nonce_is_never_taken(tmp_path):
    from trace_rl.stages.config import load_config
    from trace_rl.trainer.group_handle import GroupDied, TrainerGroup

    cfg = load_config("demo", ["train.num_processes=2"])
    group = TrainerGroup(cfg.train, tmp_path)
    group.proc = subprocess.Popen([sys.executable, "-c", FOREIGN, str(tmp_path)])
    try:
        with pytest.raises(GroupDied, match=f"carries nonce '0ther0nce000', not this flow's {group.nonce}"):
            group.request("offload", {})
        assert (tmp_path / f"0001-{group.nonce}-offload.taken").exists()
        assert group.dead and group.offload() == "no trainer group running"
    finally:
        group.proc.kill()
        group.proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_flows_group_dies_and_the_rerun_equals_the_uninterrupted_run(tmp_path, tiny_testbed_dir,
                                                                              cpu_gloo):
    """Issue 26: SIGKILL the flow while its group trains round 1. Before, the orphan trained on
    to the end of the round (7 s here) and wrote its answer, which a restarted flow took for its
    own. Now every process of the group ends within seconds (its watchdog), it answers nothing,
    and the restarted flow's weights equal an uninterrupted run's bit for bit."""
    bench = _benchmark("orphan_group")
    ref = tmp_path / "ref"
    ref.mkdir()
    proc = bench.driver(ref, bench.overrides(ref, tiny_testbed_dir, 2), "ref.log")
    assert proc.wait(600) == 0, (ref / "ref.log").read_text()[-3000:]
    work = tmp_path / "killed"
    work.mkdir()
    args = bench.overrides(work, tiny_testbed_dir, 2)
    got = bench.kill_mid_round(work, args, 1)
    assert len(got["pids"]) >= 3 and got["lifetime_s"] < 10 and not got["answered"], got
    print(f"the orphaned group ended {got['lifetime_s']} s after its flow's SIGKILL")
    proc = bench.driver(work, args, "rerun.log")
    assert proc.wait(600) == 0, (work / "rerun.log").read_text()[-3000:]
    launches = (work / "run/scratch/trainer-group" / LAUNCHES).read_text().splitlines()
    assert len(launches) == 2 and len({json.loads(line)["nonce"] for line in launches}) == 2
    final = "run/checkpoints/round-0002/model.safetensors"
    want, have = load_file(str(ref / final)), load_file(str(work / final))
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want), [k for k in want if not torch.equal(want[k], have[k])]


# The group's entry point with process 1 hanging in its first round (a stuck rank).
HANG_GROUP = r"""
import os, sys, time
from pathlib import Path
import trace_rl.trainer.worker_group as wg
real = wg._run_round
def hang_on_rank_1(msg, acc, resident):
    if acc.process_index == 1:
        Path(os.environ["HANG_MARKER"]).write_text(str(time.time()))
        time.sleep(3600)
    return real(msg, acc, resident)
wg._run_round = hang_on_rank_1
wg.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_hung_process_fails_the_round_within_the_collective_timeout(tmp_path, tiny_testbed_dir, cpu_gloo,
                                                                      monkeypatch):
    import time

    from trace_rl.data_schemas.errors import StageError

    marker = tmp_path / "hung"
    monkeypatch.setenv("HANG_MARKER", str(marker))
    cfg = _config(tmp_path, tiny_testbed_dir, rounds=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"collective_timeout_s": 10.0})})
    (tmp_path / "hang_group.py").write_text(HANG_GROUP)
    get_stage("prepare")(cfg, None, progress=False)
    for stage in ("rollout", "verify", "annotate"):
        get_stage(stage)(cfg, 0, progress=False)
    with trainer_group_session(cfg, [str(tmp_path / "hang_group.py")]) as group:
        with pytest.raises(StageError, match=r"round-0 failed in the trainer group(.|\n)*[Tt]imed? ?out"):
            get_stage("train")(cfg, 0, progress=False)
        failed = time.time()
        assert group.dead
    waited = failed - float(marker.read_text())
    # the deadline (counted from when process 0 enters its collective, after loading the model),
    # plus the launcher's teardown, on 2 busy cores: far below torch's 30 minutes (gloo: 2 hours)
    assert waited < 10.0 + 45.0, waited
    print(f"the round failed {waited:.1f} s after process 1 hung (timeout 10 s)")
