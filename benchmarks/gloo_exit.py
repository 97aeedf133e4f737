"""How often a 2-process gloo group dies at interpreter exit when its ranks do not leave the
process group, and how often when they do (`trace_rl.trainer.watchdog.leave_group`).

    python benchmarks/gloo_exit.py [--trials 30]

Each trial is one `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) of a script
that does one all_reduce and a barrier, then ends, with and without `leave_group` (alternating,
so that load affects both alike). A rank left in its group can abort during interpreter
shutdown ("terminate called without an active exception", exit -6) after its work is done: the
launch then fails although every file was written. Prints the failed launches per variant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = r"""
import os, torch
from accelerate import Accelerator
acc = Accelerator()
t = torch.ones(4) * acc.process_index
torch.distributed.all_reduce(t)
acc.wait_for_everyone()
if os.environ["LEAVE"] == "1":
    from trace_rl.trainer.watchdog import leave_group
    leave_group(acc)
"""


def launch(script: Path, leave: bool) -> tuple[int, str]:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's CLI must be installed next to the Python interpreter"
    env = {**os.environ, "LEAVE": "1" if leave else "0", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=300)
    return done.returncode, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="launches per variant")
    ns = parser.parse_args()
    failed = {False: 0, True: 0}
    aborts = {False: 0, True: 0}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "gloo_exit.py"
        script.write_text(SCRIPT)
        for i in range(ns.trials):
            for leave in (False, True):
                rc, err = launch(script, leave)
                failed[leave] += rc != 0
                aborts[leave] += "terminate called" in err or "SIGABRT" in err
            print(f"trial {i + 1}/{ns.trials}: failed launches without leave_group "
                  f"{failed[False]}, with {failed[True]}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}, {time.time() - start:.0f} s")
    for leave in (False, True):
        print(f"{'with' if leave else 'without'} leave_group: {failed[leave]}/{ns.trials} launches "
              f"failed, {aborts[leave]} of them by SIGABRT at exit")


if __name__ == "__main__":
    main()
