"""How long a trainer worker group outlives its flow (issue 26): SIGKILL the flow mid-round.

    ACCELERATE_USE_CPU=true python benchmarks/orphan_group.py [--kill-round 1] [--trials 1]

A driver process (a flow stand-in: prepare, then rollout, verify, annotate and train per round
with one worker group of 2 CPU processes on gloo, tests/test_trainer_worker_group.py's setup) is
killed with SIGKILL as soon as the group has taken round `--kill-round`'s train request. Prints
how long the group's processes (launcher and ranks) lived after the kill, and whether the
orphan still answered the dead flow's request. Run it against an older tree with PYTHONPATH
pointing at a `trace_rl` package made of that tree's folders.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

DRIVER = r"""
import sys
from trace_rl.stages import get_stage
from trace_rl.stages.config import load_config
from trace_rl.trainer.group_handle import trainer_group_session
cfg = load_config("demo", sys.argv[1:])
get_stage("prepare")(cfg, None, progress=False)
with trainer_group_session(cfg) as group:
    for k in range(cfg.run.rounds):
        for stage in ("rollout", "verify", "annotate", "train"):
            get_stage(stage)(cfg, k, progress=False)
print("finished", flush=True)
"""


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name; None: gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields


def tree(pid: int) -> set[int]:
    """`pid` and its live descendants (torchrun starts each worker in a session of its own)."""
    found, grew = {pid}, True
    while grew:
        grew = False
        for d in Path("/proc").glob("[0-9]*"):
            f = _stat(int(d.name))
            if f and int(f[1]) in found and int(d.name) not in found:
                found.add(int(d.name))
                grew = True
    return found


def overrides(work: Path, testbed: str, rounds: int) -> list[str]:
    from tiny import TINY_RUN

    accel = work / "ddp_cpu.yaml"  # MULTI_GPU under ACCELERATE_USE_CPU: torchrun on gloo
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                     "num_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\nmachine_rank: 0\n")
    return [*TINY_RUN, f"run.root={work / 'run'}", f"model.testbed_dir={testbed}", f"run.rounds={rounds}",
            "train.state_every=5", "eval.benchmarks=[]", "train.num_processes=2",
            f"train.accelerate_config={accel}", "train.tensorboard=false"]


def driver(work: Path, args: list[str], log_name: str) -> subprocess.Popen:
    (work / "driver.py").write_text(DRIVER)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    env.pop("TRACE_RL_RUN_LOCK", None)
    with open(work / log_name, "wb") as out:
        return subprocess.Popen([sys.executable, str(work / "driver.py"), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def kill_mid_round(work: Path, args: list[str], k: int, timeout: float = 600) -> dict:
    """Start the driver, SIGKILL it once the group took round k's train request; returns
    {"lifetime_s": how long the group lived after the kill, "answered": whether it still
    wrote the dead flow's answer, "pids": the group's processes}."""
    proc = driver(work, args, "killed.log")
    cmd_dir = work / "run" / "scratch" / "trainer-group"
    deadline = time.monotonic() + timeout
    while not list(cmd_dir.glob(f"*round-{k}.taken")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the driver never reached round {k}: {(work / 'killed.log').read_text()[-3000:]}")
        time.sleep(0.05)
    group = tree(proc.pid) - {proc.pid}
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while any(_stat(p) for p in group) and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    lifetime = time.monotonic() - t0
    answered = bool(list(cmd_dir.glob(f"*round-{k}.done.json")))
    return {"lifetime_s": round(lifetime, 2), "answered": answered, "pids": sorted(group)}


def main() -> None:
    from trace_rl.stages.config import load_config
    from trace_rl.testbed.build import build_testbed
    from tiny import TINY_TESTBED

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kill-round", type=int, default=1)
    ap.add_argument("--trials", type=int, default=1)
    args = ap.parse_args()
    import trace_rl.trainer.worker_group as wg

    print(f"worker_group: {wg.__file__}  load average: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        testbed = build_testbed(load_config("demo", TINY_TESTBED).model.testbed, f"{tmp}/tb", progress=False)
        for i in range(args.trials):
            work = Path(tmp) / f"trial-{i}"
            work.mkdir()
            got = kill_mid_round(work, overrides(work, testbed, args.kill_round + 1), args.kill_round)
            print(f"trial {i}: group of {len(got['pids'])} processes lived {got['lifetime_s']} s after "
                  f"its flow's SIGKILL; answered the dead flow: {got['answered']}; "
                  f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
