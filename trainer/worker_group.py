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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from trace_rl.pipeline.progress_lines import StderrForwarder, lines_to_stderr
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


# --- the flow's side -------------------------------------------------------------------------


class GroupDied(RuntimeError):
    """The group ended without answering (killed, out of memory, ...): the stage starts cold."""


def launch_prefix(train_cfg: Any) -> list[str]:
    """`accelerate launch` with the train config's process count and accelerate config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(train_cfg.num_processes)]
    if train_cfg.accelerate_config:
        cmd += ["--config_file", train_cfg.accelerate_config]
    return cmd


class TrainerGroup:
    """The flow process's handle on a worker group: started on the first request, stopped by
    `close` (and by the group itself when this process is gone)."""

    def __init__(self, train_cfg: Any, cmd_dir: str | Path, program: list[str] | None = None,
                 stop_timeout: float = 600.0) -> None:
        self.train_cfg = train_cfg
        self.dir = Path(cmd_dir)
        self.program = program or ["-m", "trace_rl.trainer.worker_group"]
        self.stop_timeout = stop_timeout
        self.proc: Any = None  # the launcher's subprocess.Popen once started
        self.forward: StderrForwarder | None = None  # its stderr reader, once started
        self.dead: str | None = None  # why the group is no longer usable
        self.seq = 0
        self.tag: str | None = None  # the manifest that committed the group's last round
        # This flow's mark on its requests; a group answers only its own flow's requests, and
        # only answers that carry it are taken.
        self.nonce = uuid.uuid4().hex[:12]

    def _start(self) -> None:
        import subprocess

        from trace_rl.pipeline.runlock import process_identity

        self.dir.mkdir(parents=True, exist_ok=True)
        end_earlier_groups(self.dir)
        for f in self.dir.iterdir():  # requests and answers of an earlier group
            if f.name != LAUNCHES:
                f.unlink(missing_ok=True)
        cmd = [*launch_prefix(self.train_cfg), *self.program, "--dir", str(self.dir),
               "--parent-pid", str(os.getpid()), "--parent-id", process_identity(os.getpid()) or "",
               "--nonce", self.nonce, "--timeout-s", str(self.train_cfg.collective_timeout_s)]
        log.info("trainer group: %s", " ".join(cmd))
        # its own process group: a terminal's Ctrl-C reaches the flow, which then ends the group;
        # its stderr passes through a reader whose progress lines `request` logs
        self.proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE, text=True,
                                     errors="replace", bufsize=1)
        self.forward = StderrForwarder(self.proc.stderr)

    def request(self, kind: str, body: dict) -> dict:
        """Send one request and wait for its answer. Raises GroupDied when the group ends
        without answering, StageError when the request failed in the group."""
        from trace_rl.data_schemas.errors import StageError

        if self.dead:
            raise GroupDied(self.dead)
        if self.proc is None:
            self._start()
        self.seq += 1
        name = f"{self.seq:04d}-{self.nonce}-{kind}"
        write_json(self.dir / f"{name}.json", {**body, "kind": kind.split("-")[0], "nonce": self.nonce})
        done = self.dir / f"{name}.done.json"
        while not done.exists():
            self._drain()  # the round's progress lines, into the waiting task's log
            code = self.proc.poll()
            if code is not None:
                errors = sorted(self.dir.glob(f"{name}.error*.json"))
                self.dead = f"the trainer group exited with code {code} during {name}"
                if errors:
                    tb = "\n".join(json.loads(e.read_text())["traceback"] for e in errors)
                    raise StageError(f"{name} failed in the trainer group:\n{tb}")
                raise GroupDied(self.dead)
            time.sleep(0.1)
        self._drain()
        reply = json.loads(done.read_text())
        if reply.get("nonce") != self.nonce:  # never another flow's answer
            self.dead = f"{done.name} carries nonce {reply.get('nonce')!r}, not this flow's {self.nonce}"
            raise GroupDied(self.dead)
        return reply

    def _drain(self) -> None:
        if self.forward is not None:
            self.forward.drain()

    def train(self, round_index: int, args: dict, resident_ok: bool) -> dict:
        """Round k in the group; `resident_ok`: the held state's round was committed (the stage
        sets `tag` once its manifest is written, and round k starts from that manifest)."""
        self.tag = None
        return self.request(f"round-{round_index}", {"args": args, "resident_ok": resident_ok})

    def offload(self) -> str:
        if self.proc is None or self.dead:
            return "no trainer group running"
        return self.request("offload", {})["offload"]

    def close(self, save: bool = True) -> None:
        """Stop the group: it first writes the last committed round's optimizer state (when
        `save`); a group that does not end within `stop_timeout` is terminated."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        committed = save and self.tag is not None
        write_json(self.dir / stop_file(self.nonce), {"save": committed})
        try:
            self.proc.wait(self.stop_timeout if committed else 30)
            return
        except subprocess.TimeoutExpired:
            log.warning("trainer group did not stop within its timeout: terminating it")
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue

    def terminate(self) -> None:
        """End the group now (the flow was interrupted): nothing is saved."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(10)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def end_earlier_groups(cmd_dir: Path, grace: float = 10.0) -> list[int]:
    """End the groups of earlier flows of this run that still run (their watchdog ends them
    within WATCH seconds of their flow's death; this is the second line, for a group whose
    watchdog could not run). Returns the pids ended."""
    import signal

    from trace_rl.pipeline.runlock import process_identity

    path = cmd_dir / LAUNCHES
    lines = path.read_text().splitlines() if path.exists() else []
    live = [e for e in map(json.loads, lines)
            if e.get("identity") and process_identity(e["pid"]) == e["identity"]]
    for e in live:
        log.warning("trainer group: ending the group of an earlier flow (pid %d) still running",
                    e["pid"])
        for pid in filter(None, (e["pid"], e.get("launcher"))):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + grace
    while any(process_identity(e["pid"]) == e["identity"] for e in live) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [e["pid"] for e in live]


_ACTIVE: TrainerGroup | None = None


def active_group() -> TrainerGroup | None:
    """The group of the enclosing `trainer_group_session`, if any."""
    return _ACTIVE


@contextmanager
def trainer_group_session(cfg: Any, program: list[str] | None = None) -> Iterator[TrainerGroup | None]:
    """One worker group for the train stages run inside the block, when `cfg` (a TraceConfig)
    trains in several processes with `train.persistent`; else None (nothing to hold). The group
    starts with the first round that needs it. On a normal exit or an error it is asked to stop
    (writing the last committed round's optimizer state); on Ctrl-C / SystemExit it is ended at
    once."""
    global _ACTIVE
    t = cfg.train
    if not t.persistent or not (t.accelerate_config or t.num_processes > 1):
        yield None
        return
    if _ACTIVE is not None:
        raise RuntimeError("a trainer group session is already active in this process")
    from trace_rl.pipeline.store import RunStore

    group = TrainerGroup(t, RunStore(cfg.run.run_root).local_path("scratch/trainer-group"), program)
    _ACTIVE = group
    try:
        yield group
    except (KeyboardInterrupt, SystemExit):
        group.terminate()
        raise
    finally:
        _ACTIVE = None
        group.close()
