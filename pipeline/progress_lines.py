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
import sys
import time

PROGRESS_LOGGER = "trace_rl.progress"
log = logging.getLogger(PROGRESS_LOGGER)


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
