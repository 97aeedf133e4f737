"""A trainer process that belongs to its flow: the watchdog every rank runs (it ends the process
within WATCH seconds of its flow's or launcher's death), the Accelerator with the collective
deadline, and atomic JSON answers. Shared by the resident worker group (worker_group.py) and
the per-round launch (launch.py), in a module of its own so that neither imports the other."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("trace_rl.trainer.worker_group")

WATCH = 0.5  # seconds between a process's checks that its flow and launcher still run
LAST_WORDS_S = 1.0  # at most this long to log and flush before an orphaned process ends
ORPHANED = 75  # exit status of a process whose flow or launcher is gone


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (killed, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: kill(0) is all there is


def orphaned(parent_pid: int | None, parent_id: str | None, launcher: int) -> str | None:
    """Why this process no longer belongs to a flow (None while it does): the flow process is
    gone, or its pid now names another process, or the launcher is gone."""
    from trace_rl.pipeline.runlock import process_identity

    if parent_pid is not None:
        now = process_identity(parent_pid) if parent_id else None
        if not _alive(parent_pid) or (now is not None and now != parent_id):
            return f"the flow process {parent_pid} is gone"
    if os.getppid() != launcher:
        return f"the launcher {launcher} is gone"
    return None


def _flush_streams() -> None:
    """Flush stdout and stderr before an `os._exit`, whatever became of them: a process started
    with fd 1 or 2 closed has None there, and a closed or broken pipe raises; neither may keep
    the process from ending."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def end_if_orphaned(parent_pid: int | None, parent_id: str | None, launcher: int, what: str) -> None:
    """Right before an answer is written: end this process, answering nothing, when its flow
    is gone. The watchdog polls every WATCH seconds, so a round that ends within that time of
    the flow's death would otherwise still answer the dead flow (its nonce keeps a restarted
    flow from taking it, but the answer must not exist)."""
    why = orphaned(parent_pid, parent_id, launcher)
    if why:
        message = f"trainer group: {why}; {what} is not answered, process {os.getpid()} ends now"
        exit_process(ORPHANED, message, grace_s=LAST_WORDS_S)


def watch_flow(parent_pid: int | None, parent_id: str | None, launcher: int) -> None:
    """Every process, in a daemon thread: end the process once its flow is gone, whatever the
    main thread is doing (a round can run for hours; the flow that asked for it is dead and a
    restarted flow must not meet this group's files or devices)."""
    while True:
        time.sleep(WATCH)
        why = orphaned(parent_pid, parent_id, launcher)
        if why:
            message = f"trainer group: {why}; process {os.getpid()} ends now (nothing saved)"
            exit_process(ORPHANED, message, grace_s=LAST_WORDS_S)


def make_accelerator(timeout_s: float) -> Any:
    """The group's Accelerator, its process group with the collective deadline."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))])


def leave_group(accelerator: Any) -> None:
    """End this process's part in the group: wait for every rank, then destroy the process
    group. A gloo group left alive to interpreter exit can abort the process there ("terminate
    called without an active exception", exit -6) after its work was done and written."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def exit_process(code: int, why: str | None = None, grace_s: float = 10.0) -> NoReturn:
    """End a trainer process without interpreter finalization, after logging `why` (as an error)
    and flushing the logging handlers and stdio for at most `grace_s` seconds: nothing may keep
    the process from ending (a stderr pipe that its reader no longer drains blocks every write,
    and a thread blocked there holds the handler's lock).

    Finalization is skipped because a process group destroyed by `leave_group` stays alive while
    Python objects hold it (an FSDP2 model's device mesh), and its gloo threads then meet the
    interpreter's teardown: "terminate called without an active exception", exit -6, after the
    round was written and answered, which fails the launch (benchmarks/gloo_exit.py)."""
    def last_words() -> None:
        if why:
            log.error("%s", why)
        logging.shutdown()  # flushes every handler
        _flush_streams()

    try:
        words = threading.Thread(target=last_words, daemon=True, name="trainer-exit")
        words.start()
        words.join(grace_s)
    finally:
        os._exit(code)


def run_then_exit(main: Callable[[], Any]) -> NoReturn:
    """A trainer entry point's `__main__`: run `main`, then `exit_process` with its status (0,
    SystemExit's, or 1 after printing an exception's traceback)."""
    code = 1
    try:
        main()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - any failure: its traceback, then status 1
        traceback.print_exc()
    exit_process(code)
