"""Ctrl-C and SIGTERM end a command the same, safe way: the stage in progress stops, every
`finally` and context manager runs (the engine session, the resident trainer, worker pools and
servers the command started are closed), nothing committed is touched, and the command exits
with 128 + the signal's number. A rerun continues from the first incomplete stage.

Two things make that hold:
- SIGTERM (sent by `kill`, a scheduler or a container stop, to this process only) raises the
  same KeyboardInterrupt as Ctrl-C, so one cleanup path serves both.
- Prefect's temporary API server is started in a session of its own. Ctrl-C in a terminal
  signals the whole foreground process group; a server in that group died at once and the flow
  then spent minutes retrying to report its end to it. In its own session it outlives the flow's
  last report and is stopped by Prefect's exit hook.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types

_received: list[int] = []


def _on_signal(signum, frame) -> None:
    _received.append(signum)
    # A second signal while cleaning up must not be swallowed: restore the default, so it ends
    # the process at once.
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def install() -> None:
    """SIGTERM (and SIGHUP: the terminal went away) raise KeyboardInterrupt; SIGINT is recorded
    the same way. Main thread only."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def received() -> bool:
    """Whether a signal arrived (the command was interrupted, however it unwound)."""
    return bool(_received)


def exit_code() -> int:
    """128 + the first signal received (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def signal_name() -> str:
    return signal.Signals(_received[0]).name if _received else "SIGINT"


class _OwnSessionSubprocess(types.ModuleType):
    """`subprocess` as Prefect's server module sees it: Popen starts a new session."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # the name Prefect calls
        if os.name == "posix":
            kwargs.setdefault("start_new_session", True)
            cmd = kwargs.get("args", args[0] if args else None)
            if sys.platform == "linux" and isinstance(cmd, list) and cmd[1:3] == ["-m", "uvicorn"]:
                # Outside our process group a SIGKILL of the command no longer reaches the
                # server: it asks the kernel for SIGTERM when its parent dies, then runs uvicorn.
                wrapped = [cmd[0], "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd[1:]]
                if "args" in kwargs:
                    kwargs["args"] = wrapped
                else:
                    args = (wrapped, *args[1:])
        return subprocess.Popen(*args, **kwargs)


# Run in the server's own interpreter before uvicorn: PR_SET_PDEATHSIG (1) = SIGTERM (15), which
# survives exec; a parent that died before that call is caught by comparing the parent pid.
_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, 15, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def isolate_prefect_server() -> None:
    """Make Prefect's temporary server (SubprocessASGIServer) start in its own session."""
    try:
        from prefect.server.api import server as prefect_server
    except ImportError:  # pragma: no cover - Prefect is a dependency
        return
    if not isinstance(getattr(prefect_server, "subprocess", None), _OwnSessionSubprocess):
        prefect_server.subprocess = _OwnSessionSubprocess("subprocess")


def interrupted_message(command: str) -> str:
    return (f"interrupted ({signal_name()}): the stage in progress was stopped; every finished "
            f"stage is kept and unchanged. Rerun `{command}` to continue from there.")


def argv_command() -> str:
    return " ".join(["trace-rl", *sys.argv[1:]])
