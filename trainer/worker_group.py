"""One resident trainer across processes: a worker group under `accelerate launch`, started once
per flow, that trains one round after another with the prepared model and optimizer held in
memory on every process.

    accelerate launch [--config_file C] --num_processes N -m trace_rl.trainer.worker_group \
        --dir RUN/scratch/trainer-group --parent-pid PID --nonce NONCE [--timeout-s T]

Protocol (files in `--dir`, each written whole with os.replace):
- the flow process writes a request `NNNN-NONCE-KIND.json` (KIND: `round-K` or `offload`; NONCE:
  the flow's own, fresh for each group it starts); a group takes only requests with its nonce and
  every answer carries it, in its name and in its body, so a group orphaned by an earlier flow of
  the run can never answer the next flow's `0001-...` request (issue 26: it once did);
- the main process polls the directory, renames the request to `NNNN-NONCE-KIND.taken` and broadcasts
  it to every process (a gloo group of its own, so that NCCL is never kept waiting); an idle group
  broadcasts a no-op every `TICK` seconds, so no process waits on a collective for long;
- every process runs the request with the state it holds, and the main process answers with
  `NNNN-KIND.done.json` ({"rows", "replayed_rounds", "replay_max_abs_delta", "resident"});
- a round that raises on any process writes `NNNN-KIND.error.json` (rank 0) or
  `NNNN-KIND.error-rankR.json` with the traceback, and that process exits: the launcher then
  ends the whole group (a collective half-entered cannot be recovered), and the stage reports it;
- `stop-NONCE.json` ({"save": bool}) ends the group, first writing the held optimizer state into
  its checkpoint when `save` says that round is committed;
- the group belongs to its flow: on every process a watchdog thread ends the process within
  `WATCH` seconds once the flow process (`--parent-pid`, checked by pid and start time) or the
  launcher is gone, mid-round too (the flow may die by SIGKILL without cleanup; the processes'
  exit frees their devices, and the launcher ends when its processes do). A flow that starts a
  group first ends any earlier group of the run still alive (`launches.jsonl` names them);
- every collective has the `--timeout-s` deadline (train.collective_timeout_s): a hung process
  fails the round on the others within it instead of torch's 30-minute (gloo: 2-hour) defaults.

A round uses the held state only when the request says the stage that produced it committed
(`resident_ok`) and it is the state at the round's start checkpoint under the same config;
otherwise the state is dropped and the round starts cold from disk, replaying the request's
`replay` plan (the rounds since the last full state, checked on every process against their
checkpoints by `check_replayed`, refused beyond its tolerance). The main process appends one
line to `launches.jsonl` when the group starts, which is how launches are counted.

The flow's side (starting the group, sending requests, taking answers) is
trainer/group_handle.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from trace_rl.pipeline.progress_lines import lines_to_stderr
from trace_rl.trainer.watchdog import (end_if_orphaned, exit_process, leave_group, make_accelerator,
                                       orphaned, run_then_exit, watch_flow, write_json)

log = logging.getLogger("trace_rl.trainer.worker_group")

TICK = 0.25  # seconds between the main process's polls (and idle no-op broadcasts)
REQUEST = re.compile(r"^\d{4}-[a-z0-9-]+\.json$")
LAUNCHES = "launches.jsonl"


class _Channel:
    """Rank 0 -> every rank, on a gloo group of its own (a no-op in a single process)."""

    def __init__(self, accelerator: Any, timeout_s: float) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.multi = accelerator.num_processes > 1 and dist.is_initialized()
        self.group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                      if self.multi else None)

    def broadcast(self, obj: Any) -> Any:
        if not self.multi:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def stop_file(nonce: str | None) -> str:
    return f"stop-{nonce}.json" if nonce else "stop.json"


def _mine(name: str, nonce: str | None) -> bool:
    """A request of this group's flow: `NNNN-NONCE-KIND.json` (any request when started
    without a nonce, by hand)."""
    return bool(REQUEST.match(name)) and (nonce is None or name.split("-")[1] == nonce)


def _next_message(cmd_dir: Path, parent: tuple[int | None, str | None], launcher: int,
                  nonce: str | None) -> dict:
    """Rank 0: the next request of this group's flow, a stop, or a no-op after one tick."""
    why = orphaned(*parent, launcher)
    if why:
        return {"kind": "stop", "save": False, "why": why}
    stop = cmd_dir / stop_file(nonce)
    if stop.exists():
        return {"kind": "stop", **json.loads(stop.read_text()), "why": "stop requested"}
    requests = sorted(p for p in cmd_dir.iterdir() if _mine(p.name, nonce))
    if requests:
        req = requests[0]
        body = json.loads(req.read_text())
        os.replace(req, req.with_suffix(".taken"))
        return {**body, "name": req.stem}
    time.sleep(TICK)
    return {"kind": "noop"}


def _run_round(msg: dict, accelerator: Any, resident: Any) -> dict:
    from trace_rl.trainer.config import TrainConfig
    from trace_rl.trainer.launch import run_round
    from trace_rl.trainer.resident import config_json

    args = msg["args"]
    cfg = TrainConfig.model_validate(args.get("config", {}))
    reason = None if msg.get("resident_ok") else "its round was not committed"
    reason = reason or resident.mismatch(args["init_checkpoint"], config_json(cfg), accelerator)
    if resident.held is not None and reason:
        log.warning("trainer group: held state dropped (%s); round %s starts from %s on disk",
                    reason, args["round_index"], args["init_checkpoint"])
        resident.clear()
    warm = resident.held is not None
    args = {**args, "replay": [] if warm else args.get("replay", [])}
    rows, worst = run_round(args, accelerator, resident)
    return {"rows": rows, "replayed_rounds": len(args["replay"]),
            "replay_max_abs_delta": worst if args["replay"] else None, "resident": warm}


def _record_launch(cmd_dir: Path, acc: Any, launcher: int, nonce: str | None) -> None:
    """Rank 0: one line in `launches.jsonl` (launches are counted by it; a later flow ends a
    group of it still alive by pid, start time and launcher)."""
    from trace_rl.pipeline.runlock import process_identity

    with open(cmd_dir / LAUNCHES, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "identity": process_identity(os.getpid()),
                            "launcher": launcher, "nonce": nonce, "processes": acc.num_processes,
                            "started": time.time()}) + "\n")
    log.info("trainer group started: %d process(es), commands in %s", acc.num_processes, cmd_dir)


def _answer(msg: dict, acc: Any, resident: Any, cmd_dir: Path, nonce: str | None) -> dict:
    """Run one request on this process; a failure is written down and ends the process."""
    try:
        if msg["kind"] == "offload":
            reply = {"offload": resident.offload()}
        elif msg["kind"] == "round":
            reply = _run_round(msg, acc, resident)
        else:
            raise ValueError(f"unknown trainer group request {msg['kind']!r}")
        acc.wait_for_everyone()
    except BaseException:
        suffix = "error" if acc.is_main_process else f"error-rank{acc.process_index}"
        write_json(cmd_dir / f"{msg['name']}.{suffix}.json",
                   {"rank": acc.process_index, "nonce": nonce, "traceback": traceback.format_exc()})
        log.exception("trainer group: %s failed on process %d", msg["name"], acc.process_index)
        exit_process(1)
    return {**reply, "nonce": nonce}


def serve(cmd_dir: str | Path, accelerator: Any = None, parent_pid: int | None = None, *,
          nonce: str | None = None, parent_id: str | None = None, timeout_s: float = 900.0) -> None:
    """The group's loop (every process calls it); returns when a stop arrives."""
    import threading

    from trace_rl.trainer.resident import Resident

    cmd_dir = Path(cmd_dir)
    launcher = os.getppid()
    threading.Thread(target=watch_flow, args=(parent_pid, parent_id, launcher), daemon=True,
                     name="trainer-group-watch").start()
    acc = accelerator or make_accelerator(timeout_s)
    channel = _Channel(acc, timeout_s)
    resident = Resident()
    rank0 = acc.is_main_process
    if rank0:
        _record_launch(cmd_dir, acc, launcher, nonce)
    while True:
        msg = channel.broadcast(_next_message(cmd_dir, (parent_pid, parent_id), launcher, nonce)
                                if rank0 else None)
        if msg["kind"] == "noop":
            continue
        if msg["kind"] == "stop":
            log.info("trainer group stopping: %s", msg.get("why"))
            if msg.get("save"):
                path = resident.save_state()  # collective under FSDP
                if path and rank0:
                    log.info("trainer state written to %s", path)
            resident.clear()
            leave_group(acc)
            return
        reply = _answer(msg, acc, resident, cmd_dir, nonce)
        if rank0:
            end_if_orphaned(parent_pid, parent_id, launcher, msg["name"])
            write_json(cmd_dir / f"{msg['name']}.done.json", reply)


def main(argv: list[str] | None = None, accelerator: Any = None) -> None:
    from trace_rl.trainer.config import TrainConfig

    parser = argparse.ArgumentParser(description="A resident TRACE trainer group (one round per request).")
    parser.add_argument("--dir", required=True, help="the command directory")
    parser.add_argument("--parent-pid", type=int, default=None, help="end when this process is gone")
    parser.add_argument("--parent-id", default=None, help="the parent's boot id and start ticks "
                        "(a reused pid is not the parent)")
    parser.add_argument("--nonce", default=None, help="the flow's nonce: take only its requests")
    parser.add_argument("--timeout-s", type=float, help="deadline of every collective, seconds",
                        default=TrainConfig.model_fields["collective_timeout_s"].default)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lines_to_stderr()  # the progress lines, for the flow's TrainerGroup to forward
    serve(ns.dir, accelerator, ns.parent_pid, nonce=ns.nonce, parent_id=ns.parent_id,
          timeout_s=ns.timeout_s)


if __name__ == "__main__":
    run_then_exit(main)

