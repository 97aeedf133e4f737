"""Worker processes that run a verifier with a per-item timeout.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one stuck worker, and a
worker that dies breaks the whole executor. Here each worker has its own pipe; the parent sends
it a chunk of items and gets one verdict back per item. Two layers bound an item's time:
- soft: the worker arms ``SIGALRM`` (``setitimer``) around each item; the handler raises
  ``ItemTimeout`` (a BaseException, so library ``except Exception`` blocks cannot swallow it)
  and the item becomes a ``timeout`` verdict;
- hard: if no verdict arrives within ``timeout_s + kill_grace_s`` (a C call that ignores
  signals, a bare ``except:``), the parent kills the process, gives the item a ``timeout``
  verdict, requeues the rest of the chunk and starts a replacement worker.
A worker that dies gives its current item an ``error`` verdict. Nothing is ever dropped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from typing_extensions import Self

from trace_rl.stages.verifiers.registry import DETAIL_MAX_CHARS, CheckFn, Verdict, get_verifier
from trace_rl.stages.verifiers.config import VerifyConfig

# Spawned workers import sympy and math-verify first; that can take a while on a loaded box.
STARTUP_TIMEOUT_S = 180.0

# (index in the batch, response_text, reference, meta)
Item = tuple[int, str, str, Mapping[str, Any]]


class ItemTimeout(BaseException):
    """Raised by the SIGALRM handler inside a worker when one item runs past its timeout."""


def _on_alarm(signum: int, frame: object) -> None:
    raise ItemTimeout


def _error_detail(exc: BaseException) -> str:
    """``'ValueError: ...'``, truncated; str() of a sympy object can itself hang, so bound it."""
    name = type(exc).__name__
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        try:
            text = str(exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except ItemTimeout:
        text = "<message could not be rendered>"
    return f"{name}: {text}"[:DETAIL_MAX_CHARS]


def check_with_alarm(check: CheckFn, item: Item, timeout_s: float) -> Verdict:
    """Run one item under a SIGALRM timeout (main thread of a worker process only)."""
    _, response, reference, meta = item
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return check(response, reference, meta)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except ItemTimeout:
        return Verdict("timeout", detail=f"verification took longer than {timeout_s:g}s")
    except Exception as exc:  # noqa: BLE001 - any failure of one item is that item's verdict
        return Verdict("error", detail=_error_detail(exc))


def _worker_main(conn: Connection, cfg_data: dict[str, Any]) -> None:
    """Entry point of a worker process: build the checker, then verify chunks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        cfg = VerifyConfig.model_validate(cfg_data)
        check = get_verifier(cfg.kind).make(cfg)
        signal.signal(signal.SIGALRM, _on_alarm)
    except BaseException:  # noqa: BLE001 - report any setup failure to the parent
        conn.send(("fatal", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for item in chunk:
            conn.send(("verdict", item[0], check_with_alarm(check, item, cfg.timeout_s)))


@dataclass
class _Worker:
    proc: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    started_at: float
    ready: bool = False
    pending: deque[Item] = field(default_factory=deque)
    deadline: float = float("inf")


class VerifierPool:
    """A fixed number of worker processes running ``cfg.kind``; reusable across batches.

    Use as a context manager, or call ``start()`` / ``close()``. ``run(items)`` returns one
    Verdict per item, in order. ``kills`` / ``deaths`` count workers replaced so far.
    """

    def __init__(self, cfg: VerifyConfig) -> None:
        self.cfg = cfg
        self._ctx = mp.get_context(cfg.start_method)
        if cfg.start_method == "forkserver":
            # Workers fork from a server that has already imported the verifier (sympy and
            # math-verify take seconds to import), so replacing a killed worker is quick.
            # Takes effect when this process's fork server first starts.
            spec = get_verifier(cfg.kind)
            self._ctx.set_forkserver_preload([spec.make.__module__, *spec.preload])
        self._workers: list[_Worker] = []
        self._results: list[Verdict | None] = []
        self._todo: deque[list[Item]] = deque()
        self._missing = 0
        self.kills = 0
        self.deaths = 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers and wait until every one has loaded its verifier."""
        while len(self._workers) < self.cfg.workers:
            self._workers.append(self._spawn())
        while not all(w.ready for w in self._workers):
            self._pump(timeout=1.0)

    def close(self) -> None:
        """Stop all workers (politely, then by force)."""
        workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in workers:
            w.proc.join(timeout=2.0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring)."""
        return [w.proc.pid for w in self._workers]

    def run(self, items: Sequence[Item]) -> list[Verdict]:
        """Verify ``items`` (their first field must be 0..n-1 in order); one Verdict each."""
        if [it[0] for it in items] != list(range(len(items))):
            raise ValueError("items must be numbered 0..n-1 in order (their first field)")
        if not self._workers:
            self.start()
        self._results = [None] * len(items)
        self._missing = len(items)
        self._todo = deque(_chunks(items, self.cfg.chunk_size))
        try:
            while self._missing:
                for w in self._workers:
                    if w.ready and not w.pending and self._todo:
                        self._dispatch(w, self._todo.popleft())
                self._pump(timeout=self._next_deadline())
                now = time.monotonic()
                for w in [w for w in self._workers if w.pending and now > w.deadline]:
                    self._kill_stuck(w)
        except BaseException:
            # Workers may still be busy with this batch; their late verdicts must not land in
            # the next one, so an interrupted pool is shut down (run() restarts it).
            self.close()
            raise
        results, self._results, self._todo = self._results, [], deque()
        return [r for r in results if r is not None]

    # -- internals ---------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.cfg.model_dump()), daemon=True
        )
        proc.start()
        child_conn.close()
        return _Worker(proc=proc, conn=parent_conn, started_at=time.monotonic())

    def _dispatch(self, w: _Worker, chunk: list[Item]) -> None:
        w.pending = deque(chunk)
        w.deadline = time.monotonic() + self.cfg.timeout_s + self.cfg.kill_grace_s
        w.conn.send(chunk)

    def _next_deadline(self) -> float:
        deadlines = [w.deadline for w in self._workers if w.pending]
        if not deadlines:
            return 1.0
        return max(0.0, min(deadlines) - time.monotonic()) + 0.01

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for messages or worker exits, and handle them."""
        by_handle: dict[Any, _Worker] = {}
        for w in self._workers:
            by_handle[w.conn] = w
            by_handle[w.proc.sentinel] = w
        for handle in wait(list(by_handle), timeout=timeout):
            w = by_handle[handle]
            if w not in self._workers:
                continue  # replaced while handling its other handle
            try:
                while w.conn.poll():
                    self._on_message(w, w.conn.recv())
            except (EOFError, OSError):
                pass
            if not w.proc.is_alive():
                self._on_death(w)
        for w in self._workers:
            if not w.ready and time.monotonic() - w.started_at > STARTUP_TIMEOUT_S:
                self.close()
                raise RuntimeError(
                    f"verifier worker did not start within {STARTUP_TIMEOUT_S:g}s; "
                    "the machine may be overloaded: lower verify.workers"
                )

    def _on_message(self, w: _Worker, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready = True
        elif kind == "fatal":
            self.close()
            raise RuntimeError(f"verifier worker failed to start ({self.cfg.kind}):\n{msg[1]}")
        elif kind == "verdict":
            _, index, verdict = msg
            self._record(index, verdict)
            if w.pending and w.pending[0][0] == index:
                w.pending.popleft()
            w.deadline = time.monotonic() + self.cfg.timeout_s + self.cfg.kill_grace_s

    def _record(self, index: int, verdict: Verdict) -> None:
        if self._results and self._results[index] is None:
            self._results[index] = verdict
            self._missing -= 1

    def _on_death(self, w: _Worker) -> None:
        """A worker exited on its own: its current item is an error, the rest go back."""
        self.deaths += 1
        code = w.proc.exitcode
        if not w.ready:
            self.close()
            raise RuntimeError(f"verifier worker exited during startup (exit code {code})")
        self._replace(
            w, Verdict("error", detail=f"verifier worker process died (exit code {code})")
        )

    def _kill_stuck(self, w: _Worker) -> None:
        self.kills += 1
        w.proc.kill()
        w.proc.join()
        limit = self.cfg.timeout_s + self.cfg.kill_grace_s
        self._replace(w, Verdict("timeout", detail=f"worker killed: item ran past {limit:g}s"))

    def _replace(self, w: _Worker, verdict: Verdict) -> None:
        """Give the worker's current item ``verdict``, requeue the rest, start a new worker."""
        if w.pending:
            current = w.pending.popleft()
            self._record(current[0], verdict)
            if w.pending:
                self._todo.appendleft(list(w.pending))
        w.conn.close()
        self._workers[self._workers.index(w)] = self._spawn()


def _chunks(items: Sequence[Item], size: int) -> list[list[Item]]:
    """Chunks of ``size``, items with the same reference kept together (reference caches)."""
    order: dict[str, list[Item]] = {}
    for item in items:
        order.setdefault(item[2], []).append(item)
    ordered = [it for group in order.values() for it in group]
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
