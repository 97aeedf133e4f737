"""The flow's side of the worker group (trainer/worker_group.py, its protocol): `TrainerGroup`,
the flow process's handle that starts the group on the first request, sends each round as a
request file and waits for the answer with this flow's nonce; `trainer_group_session`, the
group for the train stages run inside it; and the end of groups an earlier flow left running."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trace_rl.pipeline.progress_lines import StderrForwarder
from trace_rl.trainer.watchdog import write_json
from trace_rl.trainer.worker_group import LAUNCHES, stop_file

log = logging.getLogger("trace_rl.trainer.worker_group")

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
