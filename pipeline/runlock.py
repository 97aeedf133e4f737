"""One process writes a run at a time: `<run>/.lock`, taken at the start of `run`, `stage`,
`eval` and `demo`, released at their end.

The lock is created complete: its JSON (the holder's pid, the pid's boot id and start ticks, host,
start time and command line) is written to a temporary file that is then hard-linked to `.lock`.
link() fails when `.lock` exists, so exactly one of any number of processes racing for a free run
wins, and nobody ever reads a half-written lock (the defect of issue 26: a reader took an empty,
just-created lock for a dead one and took it over while its creator went on as the holder).

A second command on the same run refuses at once, naming the holder. A lock is stale only when its
holder is provably gone: same host, and its pid is not alive, or alive with another process start
time (a reused pid). A lock from another host, or one that cannot be read (written by a version
before this one), is never taken over: the command refuses and says how to remove it. Taking over
a stale lock is serialised by an flock on `.lock.takeover` (released by the kernel if the taker
dies): under it the taker re-reads the lock and removes it only if it is still the stale one it
judged, then links its own; a second taker then finds the first's live lock and refuses.
Child processes of the holder (a stage run isolated in its own process) inherit
$TRACE_RL_RUN_LOCK and pass through.
"""

from __future__ import annotations

import fcntl
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
TAKEOVER_FILE = ".lock.takeover"
ENV = "TRACE_RL_RUN_LOCK"
log = logging.getLogger("trace_rl.runlock")


class RunLocked(TraceError):
    """Another live process holds the run (or its lock cannot be judged from here)."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started_at: float
    command: str
    token: str
    # The pid's identity as /proc tells it, "BOOT_ID:START_TICKS" (None where there is no /proc,
    # and in locks written before it was recorded): a live pid with another one is a reused pid.
    pid_start: str | None = None

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


def process_identity(pid: int) -> str | None:
    """`pid`'s boot id and start time in clock ticks since boot: exact, unlike an epoch time
    derived from them (/proc/stat's btime moves with clock adjustments)."""
    try:
        ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{int(ticks)}"
    except (OSError, ValueError, IndexError):
        return None


def alive(holder: Holder) -> bool:
    """Whether the holder may still run: False only when it is provably gone. A lock from another
    host is presumed alive: its process cannot be looked up from here."""
    if holder.host != socket.gethostname():
        return True
    if holder.pid <= 0:  # kill(0 or -1) would address whole process groups
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, under another user
    if holder.pid_start is not None:
        now = process_identity(holder.pid)
        return now is None or now == holder.pid_start
    started = _process_start(holder.pid)  # a lock of an older version: a reused pid started later
    return started is None or started <= holder.started_at + 1.0


class Unreadable(ValueError):
    """A lock file that holds no valid holder record."""


def read_holder(path: Path) -> Holder | None:
    """The lock's holder; None when there is no lock. Raises Unreadable for a lock that is not a
    holder record (this version writes locks whole, so that is an older version's or an edit)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError) as err:
        raise Unreadable(f"{path} does not hold a lock record ({text[:60]!r})") from err


def _try_link(path: Path, holder: Holder) -> bool:
    """Put a complete lock file in place unless one exists (link() refuses an existing target)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(asdict(holder)))
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:  # EPERM / ENOTSUP: a filesystem without hard links
        raise RunLocked(f"cannot create the run lock {path}: {err}; put run.root on a filesystem "
                        "with hard links (a local disk, NFS, Lustre)") from err
    finally:
        tmp.unlink(missing_ok=True)


def _sweep_temporaries(path: Path) -> None:
    """Remove the temporary lock files of creators that died before their `finally` ran (kill -9
    between writing and unlinking one): `.lock.PID.NS.tmp` whose PID no longer runs."""
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        try:
            os.kill(int(tmp.name[len(path.name) + 1:].split(".")[0]), 0)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours to judge, or a live process of another user
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)


def _refusal(run_root: object, path: Path, held: Holder) -> RunLocked:
    if held.host != socket.gethostname():
        return RunLocked(
            f"run {run_root} is in use by {held.describe()}, another host, which this one cannot "
            f"check; if no trace-rl command runs on this run there, remove {path} and retry"
        )
    return RunLocked(
        f"run {run_root} is in use by {held.describe()}; wait for it to finish or stop it "
        f"(kill {held.pid}); two processes writing one run would overwrite each other"
    )


def _take_over(path: Path, stale: Holder) -> None:
    """Remove the stale lock `stale`, serialised with other takers: only the lock judged stale is
    removed, never a live lock another taker has put in its place meanwhile."""
    with open(path.with_name(TAKEOVER_FILE), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released on close, or by the kernel if we die
        try:
            now = read_holder(path)
        except Unreadable:
            return  # replaced by something else: the caller looks again
        if now is not None and now.token == stale.token and not alive(now):
            path.unlink()


def _me(command: str | None) -> Holder:
    pid = os.getpid()
    return Holder(pid=pid, host=socket.gethostname(), started_at=time.time(),
                  command=command or " ".join(["trace-rl", *sys.argv[1:]])[:200],
                  token=f"{socket.gethostname()}:{pid}:{time.time_ns()}", pid_start=process_identity(pid))


def acquire(run_root: str | os.PathLike, command: str | None = None) -> Holder | None:
    """Take the run's lock, or raise RunLocked naming its live holder. Returns None when this
    process already holds it through a parent (nothing to release)."""
    path = Path(run_root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me(command)
    for _ in range(5):
        if _try_link(path, me):
            os.environ[ENV] = me.token
            _sweep_temporaries(path)
            return me
        try:
            held = read_holder(path)
        except Unreadable as err:
            raise RunLocked(f"run {run_root}: {err}, perhaps left by an older trace-rl; if no "
                            f"trace-rl command runs on this run, remove {path} and retry") from None
        if held is None:
            continue  # released between our two looks
        if held.token and os.environ.get(ENV) == held.token:
            return None  # a child of the holder
        if alive(held):
            raise _refusal(run_root, path, held)
        log.warning("run %s: stale lock of %s (no longer running); taking it over", run_root,
                    held.describe())
        _take_over(path, held)
    raise RunLocked(f"run {run_root}: could not take {path} (other processes keep taking it)")


def release(run_root: str | os.PathLike, holder: Holder | None) -> None:
    """Remove the lock if it is still `holder`'s."""
    if holder is None:
        return
    path = Path(run_root) / LOCK_FILE
    try:
        current = read_holder(path)
    except Unreadable:
        current = None
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
