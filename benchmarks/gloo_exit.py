"""How often a 2-process gloo launch dies at interpreter exit after its work is done, by how its
ranks end, and why `leave_group` alone is not enough once a model is sharded.

    python benchmarks/gloo_exit.py [--trials 20] [--kinds bare fsdp2] [--modes none leave exit]

Each trial is one `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) per kind and
way of ending, alternating so that load affects all alike:
- kind `bare`: one all_reduce and a barrier; `fsdp2`: a 4-layer model sharded with FSDP2
  (`fully_shard`), three AdamW steps, the model still held at the end (as a trainer holds it);
- way `none`: the script just ends; `leave`: `watchdog.leave_group` (barrier, then destroy the
  process group); `exit`: `leave_group`, then `watchdog.exit_process(0)` (no interpreter
  finalization), as trainer/launch.py and trainer/worker_group.py end.

A rank whose gloo group is still alive at interpreter exit can abort there ("terminate called
without an active exception", exit -6) after its work was written: the launch fails. After
`leave_group`, each rank records how many gloo threads still run (`gloo_tcp_loop`,
`pt_gloo_runloop`): 0 means the group was really destroyed; with an FSDP2 model it is not (the
sharded model keeps it), so only skipping finalization closes the window. Prints failed launches
and live gloo threads per kind and way.
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
import os, sys, torch
from pathlib import Path
from accelerate import Accelerator
acc = Accelerator()
if os.environ["KIND"] == "fsdp2":
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
else:
    t = torch.ones(4) * acc.process_index
    torch.distributed.all_reduce(t)
acc.wait_for_everyone()
if os.environ["MODE"] in ("leave", "exit"):
    from trace_rl.trainer.watchdog import exit_process, leave_group
    leave_group(acc)
    tasks = Path("/proc/self/task")
    alive = sum((t / "comm").read_text().startswith(("gloo", "pt_gloo")) for t in tasks.iterdir())
    Path(os.environ["OUT"] + f".{acc.process_index}").write_text(str(alive))
    if os.environ["MODE"] == "exit":
        exit_process(0)
"""


def launch(script: Path, kind: str, mode: str, out: Path) -> tuple[int, str, int | None]:
    """(return code, stderr, gloo threads alive after leave_group summed over ranks or None)."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's CLI must be installed next to the Python interpreter"
    for f in out.parent.glob(out.name + ".*"):
        f.unlink()
    env = {**os.environ, "KIND": kind, "MODE": mode, "OUT": str(out), "ACCELERATE_USE_CPU": "true",
           "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=300)
    counts = [int(f.read_text()) for f in out.parent.glob(out.name + ".*")]
    return done.returncode, done.stderr, sum(counts) if counts else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="launches per kind and way")
    parser.add_argument("--kinds", nargs="+", default=["bare", "fsdp2"], choices=["bare", "fsdp2"])
    parser.add_argument("--modes", nargs="+", default=["none", "leave", "exit"], choices=["none", "leave", "exit"])
    ns = parser.parse_args()
    variants = [(k, m) for k in ns.kinds for m in ns.modes]
    failed = dict.fromkeys(variants, 0)
    aborts = dict.fromkeys(variants, 0)
    threads: dict[tuple[str, str], set[int]] = {v: set() for v in variants}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "gloo_exit.py"
        script.write_text(SCRIPT)
        for i in range(ns.trials):
            for kind, mode in variants:
                rc, err, alive = launch(script, kind, mode, Path(tmp) / "threads")
                failed[kind, mode] += rc != 0
                aborts[kind, mode] += "terminate called" in err or "SIGABRT" in err
                if alive is not None:
                    threads[kind, mode].add(alive)
            print(f"trial {i + 1}/{ns.trials}: failed launches "
                  + ", ".join(f"{k}/{m} {failed[k, m]}" for k, m in variants)
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}, {time.time() - start:.0f} s")
    for kind, mode in variants:
        alive = "-" if mode == "none" else "/".join(map(str, sorted(threads[kind, mode]))) or "?"
        print(f"{kind:5s} {mode:5s}: {failed[kind, mode]}/{ns.trials} launches failed, "
              f"{aborts[kind, mode]} of them by SIGABRT at exit; gloo threads alive after leave_group "
              f"(both ranks): {alive}")


if __name__ == "__main__":
    main()
