"""One resident trainer across processes: a worker group under `accelerate launch`, started once
per flow, that trains one round after another with the prepared model and optimizer held in
memory on every process.

    accelerate launch [--config_file C] --num_processes N -m trace_rl.trainer.worker_group \
        --dir RUN/scratch/trainer-group --parent-pid PID

Protocol (files in `--dir`, each written whole with os.replace):
- the flow process writes a request `NNNN-KIND.json` (KIND: `round-K` or `offload`);
- the main process polls the directory, renames the request to `NNNN-KIND.taken` and broadcasts
  it to every process (a gloo group of its own, so that NCCL is never kept waiting); an idle group
  broadcasts a no-op every `TICK` seconds, so no process waits on a collective for long;
- every process runs the request with the state it holds, and the main process answers with
  `NNNN-KIND.done.json` ({"rows", "replayed_rounds", "replay_max_abs_delta", "resident"});
- a round that raises on any process writes `NNNN-KIND.error.json` (rank 0) or
  `NNNN-KIND.error-rankR.json` with the traceback, and that process exits: the launcher then
  ends the whole group (a collective half-entered cannot be recovered), and the stage reports it;
- `stop.json` ({"save": bool}) ends the group, first writing the held optimizer state into its
  checkpoint when `save` says that round is committed; the main process also ends the group when
  the flow process (`--parent-pid`) or its launcher is gone (the flow may die without cleanup).

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
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger("trace_rl.trainer.worker_group")

TICK = 0.25  # seconds between the main process's polls (and idle no-op broadcasts)
REQUEST = re.compile(r"^\d{4}-[a-z0-9-]+\.json$")
LAUNCHES = "launches.jsonl"


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Channel:
    """Rank 0 -> every rank, on a gloo group of its own (a no-op in a single process)."""

    def __init__(self, accelerator: Any) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.multi = accelerator.num_processes > 1 and dist.is_initialized()
        self.group = dist.new_group(backend="gloo", timeout=timedelta(hours=2)) if self.multi else None

    def broadcast(self, obj: Any) -> Any:
        if not self.multi:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def _next_message(cmd_dir: Path, parent_pid: int | None, launcher: int) -> dict:
    """Rank 0: the next request in the directory, a stop, or a no-op after one tick."""
    if parent_pid is not None and not _alive(parent_pid):
        return {"kind": "stop", "save": False, "why": f"the flow process {parent_pid} is gone"}
    if os.getppid() != launcher:
        return {"kind": "stop", "save": False, "why": f"the launcher {launcher} is gone"}
    stop = cmd_dir / "stop.json"
    if stop.exists():
        return {"kind": "stop", **json.loads(stop.read_text()), "why": "stop requested"}
    requests = sorted(p for p in cmd_dir.iterdir() if REQUEST.match(p.name))
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


def serve(cmd_dir: str | Path, accelerator: Any = None, parent_pid: int | None = None) -> None:
    """The group's loop (every process calls it); returns when a stop arrives."""
    from accelerate import Accelerator
    from trace_rl.trainer.resident import Resident

    cmd_dir = Path(cmd_dir)
    acc = accelerator or Accelerator()
    channel = _Channel(acc)
    resident = Resident()
    rank0 = acc.is_main_process
    launcher = os.getppid()
    if rank0:
        with open(cmd_dir / LAUNCHES, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "processes": acc.num_processes,
                                "started": time.time()}) + "\n")
        log.info("trainer group started: %d process(es), commands in %s", acc.num_processes, cmd_dir)
    while True:
        msg = channel.broadcast(_next_message(cmd_dir, parent_pid, launcher) if rank0 else None)
        kind = msg["kind"]
        if kind == "noop":
            continue
        if kind == "stop":
            log.info("trainer group stopping: %s", msg.get("why"))
            if msg.get("save"):
                path = resident.save_state()  # collective under FSDP
                if path and rank0:
                    log.info("trainer state written to %s", path)
            resident.clear()
            acc.wait_for_everyone()
            return
        try:
            if kind == "offload":
                reply = {"offload": resident.offload()}
            elif kind == "round":
                reply = _run_round(msg, acc, resident)
            else:
                raise ValueError(f"unknown trainer group request {kind!r}")
            acc.wait_for_everyone()
        except BaseException:
            suffix = "error" if rank0 else f"error-rank{acc.process_index}"
            write_json(cmd_dir / f"{msg['name']}.{suffix}.json",
                       {"rank": acc.process_index, "traceback": traceback.format_exc()})
            log.exception("trainer group: %s failed on process %d", msg["name"], acc.process_index)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        if rank0:
            write_json(cmd_dir / f"{msg['name']}.done.json", reply)


def main(argv: list[str] | None = None, accelerator: Any = None) -> None:
    parser = argparse.ArgumentParser(description="A resident TRACE trainer group (one round per request).")
    parser.add_argument("--dir", required=True, help="the command directory")
    parser.add_argument("--parent-pid", type=int, default=None, help="end when this process is gone")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(ns.dir, accelerator, ns.parent_pid)


if __name__ == "__main__":
    main()


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
        self.dead: str | None = None  # why the group is no longer usable
        self.seq = 0
        self.tag: str | None = None  # the manifest that committed the group's last round

    def _start(self) -> None:
        import subprocess

        self.dir.mkdir(parents=True, exist_ok=True)
        for f in self.dir.iterdir():  # requests and answers of an earlier group
            if f.name != LAUNCHES:
                f.unlink()
        cmd = [*launch_prefix(self.train_cfg), *self.program, "--dir", str(self.dir),
               "--parent-pid", str(os.getpid())]
        log.info("trainer group: %s", " ".join(cmd))
        # its own process group: a terminal's Ctrl-C reaches the flow, which then ends the group
        self.proc = subprocess.Popen(cmd, start_new_session=True)

    def request(self, kind: str, body: dict) -> dict:
        """Send one request and wait for its answer. Raises GroupDied when the group ends
        without answering, StageError when the request failed in the group."""
        from trace_rl.data_schemas.errors import StageError

        if self.dead:
            raise GroupDied(self.dead)
        if self.proc is None:
            self._start()
        self.seq += 1
        name = f"{self.seq:04d}-{kind}"
        write_json(self.dir / f"{name}.json", {**body, "kind": kind.split("-")[0]})
        done = self.dir / f"{name}.done.json"
        while not done.exists():
            code = self.proc.poll()
            if code is not None:
                errors = sorted(self.dir.glob(f"{name}.error*.json"))
                self.dead = f"the trainer group exited with code {code} during {name}"
                if errors:
                    tb = "\n".join(json.loads(e.read_text())["traceback"] for e in errors)
                    raise StageError(f"{name} failed in the trainer group:\n{tb}")
                raise GroupDied(self.dead)
            time.sleep(0.1)
        return json.loads(done.read_text())

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
        write_json(self.dir / "stop.json", {"save": committed})
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
