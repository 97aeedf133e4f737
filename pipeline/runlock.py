"""One process writes a run at a time: `<run>/.lock`, taken at the start of `run`, `stage`,
`eval` and `demo`, released at their end.

The lock file is created exclusively (O_EXCL) and records the holder's pid, host, start time and
command line. A second command on the same run refuses at once with those. A lock whose holder is
gone (same host, the pid no longer alive, or alive but started after the lock was taken: a
reused pid) is stale: it is reported and taken over. Child processes of the holder (a stage run
isolated in its own process) inherit $TRACE_RL_RUN_LOCK and pass through.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from trace_rl.data_schemas.errors import TraceError

LOCK_FILE = ".lock"
ENV = "TRACE_RL_RUN_LOCK"
log = logging.getLogger("trace_rl.runlock")


class RunLocked(TraceError):
    """Another live process holds the run."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started_at: float
    command: str
    token: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"pid {self.pid} on {self.host}, started {when} ({self.command})"


def _process_start(pid: int) -> float | None:
    """When `pid` started (epoch seconds), where /proc tells; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def alive(holder: Holder) -> bool:
    """Whether the holder still runs. A lock from another host is presumed alive: its process
    cannot be looked up from here."""
    if holder.pid <= 0:  # a half-written lock; and kill(0 or -1) would address whole groups
        return False
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _process_start(holder.pid)
    return started is None or started <= holder.started_at + 1.0  # a reused pid started later


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # half-written by a process killed mid-write: no holder
        return Holder(pid=-1, host=socket.gethostname(), started_at=0.0, command="?", token="")


def _try_create(path: Path, holder: Holder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(asdict(holder)))
    return True


def acquire(run_root: str | os.PathLike, command: str | None = None) -> Holder | None:
    """Take the run's lock, or raise RunLocked naming its live holder. Returns None when this
    process already holds it through a parent (nothing to release)."""
    path = Path(run_root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    held = read_holder(path)
    if held is not None and held.token and os.environ.get(ENV) == held.token:
        return None
    me = Holder(pid=os.getpid(), host=socket.gethostname(), started_at=time.time(),
                command=command or " ".join(["trace-rl", *sys.argv[1:]])[:200],
                token=f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}")
    for _ in range(3):
        if _try_create(path, me):
            os.environ[ENV] = me.token
            return me
        held = read_holder(path)
        if held is None:
            continue  # released between our two looks
        if alive(held):
            raise RunLocked(
                f"run {run_root} is in use by {held.describe()}; wait for it to finish or stop it "
                f"(kill {held.pid}); two processes writing one run would overwrite each other"
            )
        log.warning("run %s: stale lock of %s (no longer running); taking it over", run_root,
                    held.describe() if held.pid > 0 else "a process killed while taking it")
        path.unlink(missing_ok=True)
    raise RunLocked(f"run {run_root}: could not take {path} (other processes keep taking it)")


def release(run_root: str | os.PathLike, holder: Holder | None) -> None:
    """Remove the lock if it is still `holder`'s."""
    if holder is None:
        return
    path = Path(run_root) / LOCK_FILE
    current = read_holder(path)
    if current is not None and current.token == holder.token:
        path.unlink(missing_ok=True)
    if os.environ.get(ENV) == holder.token:
        del os.environ[ENV]


@contextmanager
def run_lock(run_root: str | os.PathLike, command: str | None = None):
    """Hold the run's lock for the block (a no-op for a run that is not a local path)."""
    if "://" in str(run_root) and not str(run_root).startswith("file://"):
        yield None
        return
    holder = acquire(str(run_root).removeprefix("file://"), command)
    try:
        yield holder
    finally:
        release(str(run_root).removeprefix("file://"), holder)
