"""Progress as log lines, at a steady cadence, where users look (the Prefect run log, a worker's
log file): a terminal bar shows nothing there, and a line per step floods it.

`ProgressLines(what, total, unit)` logs `update(done, ...)` when `every_s` seconds passed since
its last line (default 30 s, `$TRACE_PROGRESS_EVERY_S`), or `every_n` units, and always the
last one, with the rate and an ETA. The lines go to the `trace_rl.progress` logger, which a flow
forwards to its run's log (flows/reporting.py) and a stage run in a child process prints to its
stderr, from where its parent forwards them (flows/stage_task.py, `PROGRESS_LOGGER`).
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from typing import IO

PROGRESS_LOGGER = "trace_rl.progress"
log = logging.getLogger(PROGRESS_LOGGER)
# How a progress line reads in a child's stderr (the CLI's log format, flows/cli.py): a parent
# forwards what follows it.
MARKER = f" {PROGRESS_LOGGER}: "
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def lines_to_stderr() -> None:
    """In a process without the CLI's logging (a trainer under `accelerate launch`): progress
    lines go to stderr in the form a parent forwards (`MARKER`), once each."""
    if any(getattr(h, "trace_progress", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.trace_progress = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler would print it a second time, in another format


def progress_message(line: str) -> str | None:
    """The progress line a child's stderr line carries, or None."""
    return line.rstrip("\n").split(MARKER, 1)[1] if MARKER in line else None


class StderrForwarder:
    """Reads a child's stderr in a thread: every line passes through to ours, progress lines
    are also queued, and `drain()` logs them from the calling thread (a Prefect run context is
    per thread: a line logged from the reader thread would not reach the run's log)."""

    def __init__(self, stream: IO[str]):
        self.queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True,
                                       name="progress-forward")
        self.thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            sys.stderr.write(line)
            message = progress_message(line)
            if message is not None:
                self.queue.put(message)

    def drain(self) -> None:
        while True:
            try:
                log.info(self.queue.get_nowait())
            except queue.Empty:
                return


def run_forwarding(cmd: list[str], poll_s: float = 0.2) -> int:
    """Run `cmd` to its end, forwarding its progress lines into this thread's log."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    assert proc.stderr is not None
    forward = StderrForwarder(proc.stderr)
    try:
        while proc.poll() is None:
            forward.drain()
            time.sleep(poll_s)
    except BaseException:  # as subprocess.run does: no child outlives an interrupted parent
        proc.kill()
        proc.wait()
        raise
    forward.thread.join(5)
    forward.drain()
    return proc.returncode


def every_seconds() -> float:
    return float(os.environ.get("TRACE_PROGRESS_EVERY_S", "30"))


def on_terminal() -> bool:
    """Bars belong on a terminal only (stderr is a TTY)."""
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLines:
    """One stage's progress lines; `update` is cheap when no line is due."""

    def __init__(self, what: str, total: int, unit: str, *, done: int = 0,
                 every_s: float | None = None, every_n: int | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.every_s = every_seconds() if every_s is None else every_s
        self.every_n = every_n
        self.start_done = done
        self.start = self.last_t = time.perf_counter()
        self.last_done = done

    def due(self, done: int) -> bool:
        if done >= self.total:
            return True
        if self.every_n and done - self.last_done >= self.every_n:
            return True
        return time.perf_counter() - self.last_t >= self.every_s

    def update(self, done: int, figures: str = "", tokens: int | None = None) -> None:
        """`done` of `total` units so far; `figures` (e.g. "loss 0.12 · λ 0.5") and the tokens
        processed since this reporter started (for tok/s) go into the line."""
        if not self.due(done):
            return
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        parts = [f"{self.what}: {done}/{self.total} {self.unit}"]
        if figures:
            parts.append(figures)
        if tokens is not None:
            parts.append(f"{tokens / elapsed:.0f} tok/s")
        rate = (done - self.start_done) / elapsed
        if done < self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - done) / rate)}")
        elif done >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        log.info(" · ".join(parts))
        self.last_t, self.last_done = now, done
